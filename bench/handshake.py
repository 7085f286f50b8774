"""B10: what authentication costs — one sync round on an idle pair, by authentication mode.

The pair is already converged, so a round moves nothing: it is the opening exchange (hello,
and with keys the challenge and proof), an empty pull and an empty push, over loopback
WebSocket with a fresh connection per round. The baseline is the shared token over ws://;
"keys" adds the Ed25519 challenge–response both ways (two signatures and two verifications,
one extra round trip, the trust-list lookup); "keys + TLS" adds a TLS handshake (ECDSA P-256
certificate, pinned) and its channel binding. Same process, same replicas, alternating order.
"""

from __future__ import annotations

import sync
from sync.identity import load_identity
from sync.tls import client_context, server_context, write_self_signed
from sync.trust import trust_peer

from .harness import BenchError, Row, Sample, measure_pair, ratio_row, stopwatch

__all__ = ["b10_handshake"]

_TOKEN = "bench-token"


def _round_trial(client: sync.Peer, url: str, rounds: int, **options):
    """A trial: `rounds` one-shot rounds; each must move nothing (the pair is idle)."""

    def trial(check: bool) -> Sample:
        with stopwatch() as elapsed:
            for _ in range(rounds):
                result = client.sync_with(url, **options)
                if result.pulled or result.pushed:
                    raise BenchError(f"B10: an idle round moved {result.pulled}+{result.pushed} changes")
        return Sample(*elapsed)

    return trial


def b10_handshake(ctx, rounds: int) -> list[Row]:
    hub, laptop = ctx.ws.fresh("hub"), ctx.ws.fresh("laptop")
    cert, key = ctx.ws.folder / "b8-cert.pem", ctx.ws.folder / "b8-key.pem"
    write_self_signed(cert, key, hosts=["127.0.0.1"])
    trust_peer(hub, load_identity(laptop).public_text, name="bench", can="write")
    hub_key = load_identity(hub).public_text
    with hub.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('t', 'wf', 't')")
    servers = {
        "token": sync.serve(hub, token=_TOKEN),
        "keys": sync.serve(hub, require_keys=True),
        "tls": sync.serve(hub, require_keys=True, ssl=server_context(cert, key)),
    }
    try:
        client = sync.Peer(laptop)
        client.sync_with(servers["token"].url, token=_TOKEN)  # converge: every later round is idle
        token = _round_trial(client, servers["token"].url, rounds, token=_TOKEN)
        keys = _round_trial(client, servers["keys"].url, rounds, server_key=hub_key)
        tls = _round_trial(client, servers["tls"].url, rounds, server_key=hub_key, ssl=client_context(cafile=cert))
        keys_pair = measure_pair("B10-keys", keys, token, ctx.reps)
        tls_pair = measure_pair("B10-tls", tls, token, ctx.reps)
    finally:
        for server in servers.values():
            server.close()
        ctx.ws.discard(hub)
        ctx.ws.discard(laptop)
    scale = 1000 / rounds  # ms per round
    note = f"{rounds} rounds per sample, a new connection each"
    return [
        ratio_row("B10-keys", "idle round: Ed25519 keys both ways vs shared token (ws://)", keys_pair,
                  limit=None, unit="ms", scale=scale, notes=note),
        ratio_row("B10-tls", "idle round: keys + TLS (wss://, pinned cert) vs shared token (ws://)", tls_pair,
                  limit=None, unit="ms", scale=scale, notes=note),
    ]
