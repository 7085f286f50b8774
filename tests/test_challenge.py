"""The challenge–response handshake as pure functions: every part of the transcript matters."""

from __future__ import annotations

import pytest

from engine import ManualClock
from sync.challenge import (
    CHALLENGE_TTL_MS,
    NONCE_BYTES,
    ReplayGuard,
    ServerChallenge,
    Transcript,
    answer_challenge,
    new_nonce,
    sign_transcript,
)
from sync.errors import (
    AuthError,
    BadSignatureError,
    ExpiredChallengeError,
    MalformedChallengeError,
    ProtocolError,
    ReplayError,
)
from sync.identity import Identity

CLIENT_SITE, SERVER_SITE = "c" * 32, "5" * 32


@pytest.fixture
def parties():
    return Identity.generate(), Identity.generate()


def issue(server: Identity, client: Identity, nonce: bytes, clock: ManualClock, binding: bytes = b""):
    return ServerChallenge.issue(
        server, protocol=1, client_site=CLIENT_SITE, server_site=SERVER_SITE,
        client_key=client.public_key, client_nonce=nonce, now_ms=clock.now_ms(), binding=binding,
    )


def answer(client: Identity, nonce: bytes, challenge: ServerChallenge, **changes):
    fields = dict(
        protocol=1, client_site=CLIENT_SITE, client_nonce=nonce, server_site=SERVER_SITE,
        server_key=challenge.transcript.server_key, server_nonce=challenge.transcript.server_nonce,
        issued_at=challenge.transcript.issued_at, server_signature=challenge.signature, binding=b"",
    )
    fields.update(changes)
    return answer_challenge(client, **fields)


def test_nonces_are_fresh_and_32_bytes():
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and {len(n) for n in nonces} == {NONCE_BYTES}


def test_both_sides_prove_their_keys(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    transcript, proof = answer(client, nonce, challenge)
    assert transcript == challenge.transcript
    clock.advance(CHALLENGE_TTL_MS)  # exactly at the limit is still in time
    challenge.settle(proof, clock.now_ms())


@pytest.mark.parametrize(
    "field, value",
    [
        ("client_nonce", b"\x00" * 32),
        ("server_site", "6" * 32),
        ("issued_at", 1),
        ("binding", b"another tls channel"),
        ("protocol", 2),
    ],
)
def test_a_server_signature_over_anything_else_is_refused(parties, clock, field, value):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    with pytest.raises(BadSignatureError):
        answer(client, nonce, challenge, **{field: value})


def test_a_server_signing_with_another_key_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    impostor = Identity.generate()
    with pytest.raises(BadSignatureError):
        answer(client, nonce, challenge, server_key=impostor.public_key)


def test_a_proof_by_another_key_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    forged = sign_transcript(Identity.generate(), challenge.transcript, "client")  # not the announced key
    with pytest.raises(BadSignatureError):
        challenge.settle(forged, clock.now_ms())


def test_a_proof_from_another_session_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    first, second = issue(server, client, nonce, clock), issue(server, client, nonce, clock)
    assert first.transcript.server_nonce != second.transcript.server_nonce
    _, proof = answer(client, nonce, first)
    with pytest.raises(BadSignatureError):
        second.settle(proof, clock.now_ms())


def test_the_server_signature_cannot_be_reflected_as_a_proof(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, server, nonce, clock)  # a client claiming the server's own key
    with pytest.raises(BadSignatureError):
        challenge.settle(challenge.signature, clock.now_ms())


def test_a_channel_binding_mismatch_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock, binding=b"server side of a relayed tls")
    with pytest.raises(BadSignatureError):
        answer(client, nonce, challenge, binding=b"client side of a relayed tls")
    transcript, proof = answer(client, nonce, challenge, binding=b"server side of a relayed tls")
    challenge.settle(proof, clock.now_ms())


def test_a_late_proof_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    _, proof = answer(client, nonce, challenge)
    clock.advance(CHALLENGE_TTL_MS + 1)
    with pytest.raises(ExpiredChallengeError, match="expire") as late:
        challenge.settle(proof, clock.now_ms())
    assert isinstance(late.value, AuthError) and not late.value.permanent


def test_a_proof_dated_before_its_challenge_is_refused(parties, clock):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    _, proof = answer(client, nonce, challenge)
    clock.set(clock.now_ms() - 1)
    with pytest.raises(ExpiredChallengeError):
        challenge.settle(proof, clock.now_ms())


@pytest.mark.parametrize(
    "key, nonce, needle",
    [
        (None, new_nonce(), "client's public key is missing"),
        (b"\x01" * 31, new_nonce(), "client's public key is 31 bytes"),
        ("ok", None, "client's nonce is missing"),
        ("ok", b"\x01" * 33, "client's nonce is 33 bytes"),
    ],
)
def test_malformed_client_fields(parties, clock, key, nonce, needle):
    server, client = parties
    with pytest.raises(MalformedChallengeError, match=needle) as bad:
        ServerChallenge.issue(
            server, protocol=1, client_site=CLIENT_SITE, server_site=SERVER_SITE,
            client_key=client.public_key if key == "ok" else key, client_nonce=nonce, now_ms=0,
        )
    assert isinstance(bad.value, ProtocolError) and bad.value.code == "bad_challenge"


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(server_key=None), "server's public key is missing"),
        (dict(server_nonce=b"\x00" * 8), "server's nonce is 8 bytes"),
        (dict(server_signature=b"\x00" * 63), "server's signature is 63 bytes"),
        (dict(server_signature=None), "server's signature is missing"),
    ],
)
def test_malformed_challenges(parties, clock, changes, needle):
    server, client = parties
    nonce = new_nonce()
    challenge = issue(server, client, nonce, clock)
    with pytest.raises(MalformedChallengeError, match=needle):
        answer(client, nonce, challenge, **changes)


def test_malformed_proofs(parties, clock):
    server, client = parties
    challenge = issue(server, client, new_nonce(), clock)
    for proof, needle in ((None, "missing"), (b"\x00" * 65, "65 bytes")):
        with pytest.raises(MalformedChallengeError, match=needle):
            challenge.settle(proof, clock.now_ms())


def test_roles_label_the_signed_bytes():
    transcript = Transcript(1, CLIENT_SITE, SERVER_SITE, b"k" * 32, b"K" * 32, b"n" * 32, b"N" * 32, 5)
    assert transcript.signed_bytes("client") != transcript.signed_bytes("server")
    with pytest.raises(ValueError):
        transcript.signed_bytes("anyone")


# -- replay guard --------------------------------------------------------------------------


def test_a_nonce_is_accepted_once_per_window():
    guard = ReplayGuard(window_ms=1000)
    nonce = new_nonce()
    guard.remember(nonce, 0)
    with pytest.raises(ReplayError, match="already used 999 ms ago") as replayed:
        guard.remember(nonce, 999)
    assert replayed.value.code == "replay" and not replayed.value.permanent
    guard.remember(new_nonce(), 999)
    guard.remember(nonce, 1001)  # the window passed: forgotten (the signatures still protect)


def test_the_guard_stays_bounded():
    guard = ReplayGuard(window_ms=10**9, capacity=100)
    nonces = [new_nonce() for _ in range(250)]
    for i, nonce in enumerate(nonces):
        guard.remember(nonce, i)
    assert len(guard) == 100
    with pytest.raises(ReplayError):
        guard.remember(nonces[-1], 300)
    guard.remember(nonces[0], 300)  # forgotten early: beyond capacity


def test_expired_nonces_are_dropped():
    guard = ReplayGuard(window_ms=10)
    for t in range(100):
        guard.remember(new_nonce(), t)
    assert len(guard) <= 11
