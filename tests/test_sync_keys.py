"""Key authentication and authorization inside the sync session (in-process, real databases).

Every refusal: a typed SyncError on both sides, a log line, nothing read or applied, and the
serving Peer goes on serving the next client.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import pytest

from engine import Database
from sync import Peer
from sync.challenge import CHALLENGE_TTL_MS
from sync.errors import (
    AuthError,
    BadSignatureError,
    ExpiredChallengeError,
    MalformedChallengeError,
    NotAuthorizedError,
    PeerRefusedError,
    ProtocolError,
    ReplayError,
    UnknownPeerError,
    UntrustedServerError,
)
from sync.identity import Identity, load_identity
from sync.protocol import Challenge, Changes, Hello, Proof, decode, encode
from sync.session import Role, Session, State
from sync.trust import trust_peer

Tamper = Callable[[int, bytes], bytes | None]


def topics(db: Database) -> set[str]:
    with db.reading() as s:
        return {row[0] for row in s.execute("SELECT id FROM topics")}


def add_topic(db: Database, topic: str) -> None:
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)", (topic, topic))


def exchange(client: Session, server: Session, tamper: Tamper | None = None) -> list[bytes]:
    """Deliver every message in order (message 0 is the client's hello); `tamper(i, data)`
    may change a message or drop it (None). Returns what was delivered. Closes both."""
    delivered: list[bytes] = []
    try:
        queue = deque((server, data) for data in client.start())
        while queue:
            target, data = queue.popleft()
            if tamper is not None:
                data = tamper(len(delivered), data)
                if data is None:
                    continue
            delivered.append(data)
            other = client if target is server else server
            queue.extend((other, reply) for reply in target.receive(data))
    finally:
        client.close()
        server.close()
    return delivered


@pytest.fixture
def hub(open_db):
    """A hub replica that admits only trusted keys, with one topic of its own."""
    db = open_db("hub")
    add_topic(db, "hub-topic")
    return db


@pytest.fixture
def laptop(open_db):
    db = open_db("laptop")
    add_topic(db, "laptop-topic")
    return db


def hub_key(hub: Database) -> str:
    return load_identity(hub).public_text


def admit(hub: Database, client: Database, can: str = "write", tables=()) -> None:
    trust_peer(hub, load_identity(client).public_text, name="laptop", can=can, tables=tables)


def keyed_round(hub: Database, client: Database, tamper: Tamper | None = None, **client_options):
    server_peer = Peer(hub, require_keys=True)
    client_session = Peer(client).session(Role.CLIENT, server_key=client_options.pop("server_key", hub_key(hub)),
                                          **client_options)
    server_session = server_peer.session(Role.SERVER)
    delivered = exchange(client_session, server_session, tamper)
    return client_session, server_session, delivered


def assert_refused(client: Session, server: Session, cls: type, *, detected_by: str) -> None:
    """Both sides failed with `cls`; the side that noticed raised it itself, the other got
    the refusal as a PeerRefusedError of the same class."""
    assert client.state is State.FAILED and server.state is State.FAILED
    noticed, told = (server, client) if detected_by == "server" else (client, server)
    assert isinstance(noticed.error, cls) and not isinstance(noticed.error, PeerRefusedError), noticed.error
    assert isinstance(told.error, cls) and isinstance(told.error, PeerRefusedError), told.error


def assert_nothing_moved(hub: Database, laptop: Database) -> None:
    assert topics(hub) == {"hub-topic"} and topics(laptop) == {"laptop-topic"}


# -- admitted ------------------------------------------------------------------------------


def test_a_trusted_client_and_the_expected_server_sync_both_ways(hub, laptop):
    admit(hub, laptop)
    client, server, delivered = keyed_round(hub, laptop)
    assert client.error is None and server.error is None and client.state is State.DONE
    assert topics(hub) == topics(laptop) == {"hub-topic", "laptop-topic"}
    assert client.result.remote_key == hub_key(hub)
    assert server.result.remote_key == load_identity(laptop).public_text
    kinds = [type(decode(d)).__name__ for d in delivered[:5]]
    assert kinds == ["Hello", "Challenge", "Proof", "Hello", "Pull"]


def test_the_server_reads_nothing_before_the_proof(hub, laptop):
    admit(hub, laptop)
    seen: list = []

    def record(i: int, data: bytes) -> bytes:
        seen.append(decode(data))
        return data

    keyed_round(hub, laptop, record)
    challenge = seen[1]
    assert isinstance(challenge, Challenge) and challenge.site_id == hub.site_id
    server_hello = seen[3]
    assert isinstance(server_hello, Hello) and server_hello.watermark is not None and server_hello.can == "write"


def test_the_client_may_trust_its_server_through_its_own_trust_list(hub, laptop):
    admit(hub, laptop)
    trust_peer(laptop, hub_key(hub), name="hub", can="read")
    server_session = Peer(hub, require_keys=True).session(Role.SERVER)
    client_session = Peer(laptop, require_keys=True).session(Role.CLIENT)
    exchange(client_session, server_session)
    assert client_session.error is None and topics(laptop) == {"hub-topic", "laptop-topic"}


def test_a_server_that_does_not_require_keys_still_proves_its_own(hub, laptop):
    client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    server = Peer(hub).session(Role.SERVER)
    exchange(client, server)
    assert client.error is None and client.result.remote_key == hub_key(hub)
    assert topics(hub) == topics(laptop)


def test_token_and_keys_together(hub, laptop):
    admit(hub, laptop)
    server_peer = Peer(hub, token="s3cret", require_keys=True)
    wrong = Peer(laptop).session(Role.CLIENT, token="nope", server_key=hub_key(hub))
    server = server_peer.session(Role.SERVER)
    delivered = exchange(wrong, server)
    assert len(delivered) == 2  # the token is checked before any challenge is signed
    assert_refused(wrong, server, AuthError, detected_by="server")
    right = Peer(laptop).session(Role.CLIENT, token="s3cret", server_key=hub_key(hub))
    exchange(right, server_peer.session(Role.SERVER))
    assert right.error is None and topics(hub) == topics(laptop)


# -- refused, and the next client is still served ------------------------------------------


def test_an_unknown_key_is_refused_before_any_challenge(hub, laptop, open_db, caplog):
    with caplog.at_level(logging.WARNING, logger="sync"):
        client, server, delivered = keyed_round(hub, laptop)
    assert len(delivered) == 2  # hello, error
    assert_refused(client, server, UnknownPeerError, detected_by="server")
    assert load_identity(laptop).public_text in str(server.error)
    assert client.error.permanent
    assert "not trusted here" in caplog.text
    assert_nothing_moved(hub, laptop)
    other = open_db("other")
    admit(hub, other)
    good, _, _ = keyed_round(hub, other)
    assert good.error is None and topics(other) == {"hub-topic"}


def test_a_client_without_a_key_is_refused_when_keys_are_required(hub, laptop):
    client = Peer(laptop).session(Role.CLIENT)
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    exchange(client, server)
    assert_refused(client, server, AuthError, detected_by="server")
    assert "admits only trusted keys" in str(server.error)
    assert_nothing_moved(hub, laptop)


def test_a_server_proving_another_key_is_refused(hub, laptop):
    admit(hub, laptop)
    client, server, delivered = keyed_round(hub, laptop, server_key=Identity.generate().public_text)
    assert len(delivered) == 3  # hello, challenge, error: no proof was given
    assert_refused(client, server, UntrustedServerError, detected_by="client")
    assert_nothing_moved(hub, laptop)


def test_a_server_missing_from_the_clients_trust_list_is_refused(hub, laptop):
    admit(hub, laptop)
    client = Peer(laptop, require_keys=True).session(Role.CLIENT)
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    exchange(client, server)
    assert_refused(client, server, UntrustedServerError, detected_by="client")
    assert_nothing_moved(hub, laptop)


def test_a_downgrade_to_no_keys_is_refused_by_the_client(hub, laptop):
    """Someone in between strips the key from the client's hello: the server (not requiring
    keys) answers without a challenge, and the client refuses to go on."""

    def strip(i: int, data: bytes) -> bytes:
        message = decode(data)
        if i == 0:
            return encode(Hello(**{**{f: getattr(message, f) for f in message.__struct_fields__}, "key": None, "nonce": None}))
        return data

    client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    server = Peer(hub).session(Role.SERVER)
    exchange(client, server, strip)
    assert_refused(client, server, UntrustedServerError, detected_by="client")
    assert_nothing_moved(hub, laptop)


def flip_signature(target_index: int) -> Tamper:
    def tamper(i: int, data: bytes) -> bytes:
        if i != target_index:
            return data
        message = decode(data)
        signature = bytes([message.signature[0] ^ 1]) + message.signature[1:]
        fields = {f: getattr(message, f) for f in message.__struct_fields__}
        return encode(type(message)(**{**fields, "signature": signature}))
    return tamper


def test_a_wrong_client_signature_is_refused(hub, laptop):
    admit(hub, laptop)
    client, server, _ = keyed_round(hub, laptop, flip_signature(2))
    assert_refused(client, server, BadSignatureError, detected_by="server")
    assert_nothing_moved(hub, laptop)


def test_a_wrong_server_signature_is_refused(hub, laptop):
    admit(hub, laptop)
    client, server, _ = keyed_round(hub, laptop, flip_signature(1))
    assert_refused(client, server, BadSignatureError, detected_by="client")
    assert_nothing_moved(hub, laptop)


def test_a_key_claimed_without_its_private_key_is_refused(hub, laptop, open_db):
    """An impostor announces the laptop's (trusted) public key but signs with its own."""
    admit(hub, laptop)
    impostor_db = open_db("impostor")
    impostor = Peer(impostor_db, identity=Identity.generate())
    real_key = load_identity(laptop).public_key

    def claim(i: int, data: bytes) -> bytes:
        if i == 0:
            message = decode(data)
            fields = {f: getattr(message, f) for f in message.__struct_fields__}
            return encode(Hello(**{**fields, "key": real_key}))
        return data

    client = impostor.session(Role.CLIENT, server_key=hub_key(hub))
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    exchange(client, server, claim)
    # the server signed a transcript with the claimed key: the impostor's check fails first
    assert client.state is State.FAILED and isinstance(client.error, BadSignatureError)
    assert topics(hub) == {"hub-topic"} and topics(impostor_db) == set()


def test_a_replayed_hello_is_refused_and_the_next_client_is_served(hub, laptop):
    admit(hub, laptop)
    server_peer = Peer(hub, require_keys=True)
    recorded = exchange(Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub)), server_peer.session(Role.SERVER))
    replaying = server_peer.session(Role.SERVER)
    out = replaying.receive(recorded[0])
    assert replaying.state is State.FAILED and isinstance(replaying.error, ReplayError)
    assert decode(out[0]).code == "replay" and not replaying.error.permanent
    replaying.close()
    good = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    exchange(good, server_peer.session(Role.SERVER))
    assert good.error is None


def test_a_late_proof_is_refused(hub, laptop, clock):
    admit(hub, laptop)

    def late(i: int, data: bytes) -> bytes:
        if i == 2:
            clock.advance(CHALLENGE_TTL_MS + 1)
        return data

    client, server, _ = keyed_round(hub, laptop, late)
    assert_refused(client, server, ExpiredChallengeError, detected_by="server")
    assert not client.error.permanent  # a new connection gets a new challenge
    assert_nothing_moved(hub, laptop)


def test_a_proof_in_time_is_accepted(hub, laptop, clock):
    admit(hub, laptop)

    def slow(i: int, data: bytes) -> bytes:
        if i == 2:
            clock.advance(CHALLENGE_TTL_MS)
        return data

    client, server, _ = keyed_round(hub, laptop, slow)
    assert client.error is None and topics(hub) == topics(laptop)


def _server_after_hello(hub: Database, laptop: Database) -> tuple[Session, list[bytes]]:
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    hello = client.start()[0]
    return server, server.receive(hello)


@pytest.mark.parametrize(
    "fields, cls, needle",
    [
        (dict(key=b"\x01" * 31), MalformedChallengeError, "public key is 31 bytes"),
        (dict(nonce=b"\x01" * 8), MalformedChallengeError, "nonce is 8 bytes"),
        (dict(nonce=None), MalformedChallengeError, "nonce is missing"),
        (dict(key=None), MalformedChallengeError, "public key is missing"),
    ],
)
def test_malformed_hellos_are_refused(hub, laptop, fields, cls, needle):
    admit(hub, laptop)
    client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    message = decode(client.start()[0])
    client.close()
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    out = server.receive(encode(Hello(**{**{f: getattr(message, f) for f in message.__struct_fields__}, **fields})))
    assert isinstance(server.error, cls) and needle in str(server.error)
    assert decode(out[0]).code == "bad_challenge"
    server.close()
    assert_nothing_moved(hub, laptop)


def test_anything_but_a_proof_after_the_challenge_is_refused(hub, laptop):
    admit(hub, laptop)
    server, _ = _server_after_hello(hub, laptop)
    server.receive(encode(Changes(since=0, upto=1, rows=[], caught_up=True)))
    assert isinstance(server.error, MalformedChallengeError) and "expected the proof" in str(server.error)
    server.close()
    assert_nothing_moved(hub, laptop)


def test_a_malformed_proof_is_refused(hub, laptop):
    admit(hub, laptop)
    server, _ = _server_after_hello(hub, laptop)
    server.receive(encode(Proof(signature=b"\x00" * 10)))
    assert isinstance(server.error, MalformedChallengeError) and "10 bytes" in str(server.error)
    server.close()


def test_a_proof_without_a_hello_is_refused(hub):
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    server.receive(encode(Proof(signature=b"\x00" * 64)))
    assert isinstance(server.error, ProtocolError) and "expected hello first" in str(server.error)
    server.close()


def test_an_unrequested_challenge_is_refused(hub, laptop):
    client = Peer(laptop).session(Role.CLIENT)  # expects no key
    client.start()
    identity = load_identity(hub)
    client.receive(encode(Challenge(hub.site_id, identity.public_key, b"n" * 32, 0, b"s" * 64)))
    assert isinstance(client.error, MalformedChallengeError) and "did not ask" in str(client.error)
    client.close()


# -- authorization -------------------------------------------------------------------------


def test_a_reader_pulls_and_pushes_nothing(hub, laptop):
    admit(hub, laptop, can="read")
    client, server, _ = keyed_round(hub, laptop)
    assert client.error is None and server.error is None and client.state is State.DONE
    assert client.result.read_only and client.result.pulled > 0 and client.result.pushed == 0
    assert topics(laptop) == {"hub-topic", "laptop-topic"} and topics(hub) == {"hub-topic"}


def test_a_readers_pushed_page_is_refused_whole(hub, laptop, caplog):
    """A reader that pushes anyway (a client ignoring its grant) is refused: a typed error, a
    log line, nothing of the page applied."""
    admit(hub, laptop, can="read")
    client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub))
    server = Peer(hub, require_keys=True).session(Role.SERVER)
    queue = deque((server, data) for data in client.start())
    while queue:  # the whole round: handshake, pull; the reader sends no page
        target, data = queue.popleft()
        queue.extend((client if target is server else server, reply) for reply in target.receive(data))
    assert client.state is State.DONE and server.state is State.DONE
    with laptop.reading() as s:
        rows = [tuple(r) for r in s.execute(
            'SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes')]
    live_server = Peer(hub, require_keys=True).session(Role.SERVER)
    live_client = Peer(laptop).session(Role.CLIENT, server_key=hub_key(hub), live=True)
    queue = deque((live_server, data) for data in live_client.start())
    while queue:
        target, data = queue.popleft()
        queue.extend((live_client if target is live_server else live_server, reply) for reply in target.receive(data))
    assert live_server.state is State.LIVE and live_client.local_changes() == []  # a reader never pumps
    with caplog.at_level(logging.WARNING, logger="sync"):
        replies = live_server.receive(encode(Changes(since=0, upto=laptop.db_version, rows=rows, caught_up=True)))
    assert isinstance(live_server.error, NotAuthorizedError) and "may only read" in str(live_server.error)
    assert decode(replies[0]).code == "not_authorized" and "may only read" in caplog.text
    for session in (client, server, live_client, live_server):
        session.close()
    assert topics(hub) == {"hub-topic"}


def test_a_writer_outside_its_tables_is_refused_whole_and_still_pulled(hub, laptop):
    admit(hub, laptop, can="write", tables=["events"])
    add_topic(hub, "hub-topic-2")
    client, server, _ = keyed_round(hub, laptop)
    assert_refused(client, server, NotAuthorizedError, detected_by="server")
    assert server.error.table == "topics" and "may not write table 'topics'" in str(server.error)
    assert topics(laptop) == {"hub-topic", "hub-topic-2", "laptop-topic"}  # the pull happened
    assert topics(hub) == {"hub-topic", "hub-topic-2"}  # nothing of the push
    assert client.error.permanent


def test_a_writer_inside_its_tables_pushes(hub, laptop):
    admit(hub, laptop, can="write", tables=["topics", "events"])
    client, server, _ = keyed_round(hub, laptop)
    assert client.error is None and topics(hub) == topics(laptop)


def test_untrusting_takes_effect_on_the_next_connection(hub, laptop):
    from sync.trust import untrust_peer

    admit(hub, laptop)
    assert keyed_round(hub, laptop)[0].error is None
    untrust_peer(hub, load_identity(laptop).public_text)
    client, server, _ = keyed_round(hub, laptop)
    assert_refused(client, server, UnknownPeerError, detected_by="server")
