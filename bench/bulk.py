"""B8: the initial sync of one huge transaction, the row comparable with other engines.

The data: 20,000 rows of the engine's `events` table (its 13 columns from migrations/0001,
written through the real migrations) inserted in ONE transaction, so one db_version group of
240,000 changes: larger than a page, it travels in parts that the receiver merges in one
transaction when the last part arrives.

Three ways to move it, each against the raw floor (bench.data.raw_copy: one SELECT from
`crsql_changes`, one executemany INSERT INTO `crsql_changes`, one transaction, in-process):

    B8        in-process `Peer.sync_with(Peer)`
    B8-pull   over WebSocket between two processes: an agent process serves the source, this
              process pulls into a fresh replica (server -> client)
    B8-push   over WebSocket between two processes: this process pushes the source into a fresh
              replica served by an agent process (client -> server); timed until the round
              ends, i.e. until the server acknowledged the merge of the last part

Every row prints changes per second (ours and floor) in its notes. CPU-time ratios of the two
WebSocket rows count this process only (the other side runs in the agent).
"""

from __future__ import annotations

import sync

from .agent import Remote
from .data import CHANGES_PER_EVENT, TOKEN, Workspace, count_changes, raw_copy
from .harness import Row, Sample, measure_pair, ratio_row, stopwatch
from .replication import receiver_digest, sync_facts, sync_trials

__all__ = ["b8_huge_transaction", "IN_PROCESS_LIMIT", "WEBSOCKET_LIMIT"]

IN_PROCESS_LIMIT = 1.15
WEBSOCKET_LIMIT = 1.0


def b8_huge_transaction(ctx, rows: int) -> list[Row]:
    """B8, B8-pull, B8-push for `rows` events rows written in one transaction."""
    source = ctx.ws.source(rows * CHANGES_PER_EVENT, rows_per_tx=rows)
    changes = count_changes(source)
    facts = {"rows": rows, "transactions": 1}
    out = []

    source_peer = sync.Peer(source)
    ours, baseline, results = sync_trials(ctx.ws, source, lambda db: sync.Peer(db).sync_with(source_peer))
    pair = measure_pair("B8", ours, baseline, ctx.reps)
    out.append(_row("B8", f"sync of {rows:,} rows written in ONE transaction ({changes:,} changes), in-process",
                    pair, changes, IN_PROCESS_LIMIT, {**facts, **sync_facts(source, results)}))

    with Remote("b8-server") as server:
        server.call("open", path=source.path)
        url = server.call("serve")
        ours, baseline, results = sync_trials(ctx.ws, source, lambda db: sync.Peer(db).sync_with(url, token=TOKEN))
        pair = measure_pair("B8-pull", ours, baseline, ctx.reps)
    out.append(_row("B8-pull", "  same over WebSocket, two processes: server -> client (vs in-process floor)",
                    pair, changes, WEBSOCKET_LIMIT, {**facts, **sync_facts(source, results)}))

    pair = measure_pair("B8-push", _push_trial(ctx.ws, source_peer), _floor_trial(ctx.ws, source), ctx.reps)
    out.append(_row("B8-push", "  same over WebSocket, two processes: client -> server (vs in-process floor)",
                    pair, changes, WEBSOCKET_LIMIT, facts))
    return out


def _row(id: str, what: str, pair, changes: int, limit: float, extra: dict) -> Row:
    row = ratio_row(id, what, pair, limit=limit, extra={**extra, "changes": changes})
    ours_rate, floor_rate = changes / row.ours, changes / row.baseline
    row.notes = f"ours {ours_rate / 1e3:.1f}k changes/s, floor {floor_rate / 1e3:.1f}k changes/s; {row.notes}"
    row.extra.update(ours_changes_per_s=ours_rate, floor_changes_per_s=floor_rate)
    return row


def _push_trial(ws: Workspace, source_peer):
    """Ours for B8-push: a fresh replica served by an agent process, the source pushed into it
    from this process. The agent starts (and its replica is created) outside the timer."""

    def ours(check: bool) -> Sample:
        path = ws.path("b8-push")
        with Remote("b8-push-server") as server:
            server.call("open", path=str(path))
            url = server.call("serve")
            with stopwatch() as elapsed:
                source_peer.sync_with(url, token=TOKEN)
        received = ws.open_path(path)
        digest = receiver_digest(received) if check else None
        ws.discard(received)
        return Sample(*elapsed, digest=digest)

    return ours


def _floor_trial(ws: Workspace, source):
    def baseline(check: bool) -> Sample:
        db = ws.fresh("b8-raw")
        with stopwatch() as elapsed:
            raw_copy(source, db)
        digest = receiver_digest(db) if check else None
        ws.discard(db)
        return Sample(*elapsed, digest=digest)

    return baseline
