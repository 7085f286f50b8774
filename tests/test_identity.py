"""A replica's key pair and its trust list: stored locally, never replicated, typed errors."""

from __future__ import annotations

import threading

import pytest

from engine import Database
from sync import Peer
from sync.errors import AuthError, BadSignatureError, NotAuthorizedError, SyncError
from sync.identity import (
    KEY_PREFIX,
    Identity,
    create_identity,
    format_public_key,
    load_identity,
    parse_public_key,
    verify_signature,
)
from sync.trust import Grant, authorize_write, find_trusted, trust_peer, trusted_peers, untrust_peer


# -- identity ------------------------------------------------------------------------------


def test_a_key_is_created_once_and_survives_reopening(tmp_path):
    path = tmp_path / "a.db"
    with Database.open(path) as db:
        assert load_identity(db, create=False) is None
        first = load_identity(db)
        assert load_identity(db).public_key == first.public_key
        assert create_identity(db).public_key == first.public_key  # idempotent
    with Database.open(path) as db:
        assert load_identity(db, create=False).public_key == first.public_key


def test_two_replicas_have_different_keys(open_db):
    assert load_identity(open_db("a")).public_key != load_identity(open_db("b")).public_key


def test_concurrent_creators_agree_on_one_key(tmp_path):
    path = tmp_path / "race.db"
    Database.open(path).close()
    keys: list[bytes] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        with Database.open(path) as db:
            barrier.wait()
            keys.append(create_identity(db).public_key)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 4 and len(set(keys)) == 1


def test_the_key_never_replicates(open_db):
    a, b = open_db("a"), open_db("b")
    load_identity(a)
    trust_peer(a, load_identity(b).public_text, name="b", can="write")
    with a.reading() as s:
        tables = {row[0] for row in s.execute('SELECT DISTINCT "table" FROM crsql_changes')}
    assert not {t for t in tables if t.startswith("__")}
    assert "__sync_identity" not in a.crr_tables and "__sync_trust" not in a.crr_tables
    Peer(b).sync_with(Peer(a))
    assert load_identity(b).public_key != load_identity(a).public_key
    assert trusted_peers(b) == []


def test_public_key_text_round_trips():
    identity = Identity.generate()
    text = identity.public_text
    assert text.startswith(KEY_PREFIX) and len(text) == len(KEY_PREFIX) + 43
    assert parse_public_key(text) == identity.public_key
    assert parse_public_key(f"  {text}\n") == identity.public_key
    assert "private" not in repr(identity) and text in repr(identity)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "expected ed25519:"),
        ("rsa:AAAA", "expected ed25519:"),
        ("ed25519:***", "bad base64url"),
        ("ed25519:AAAA", "32 bytes"),
        ("ed25519:" + "A" * 44, "32 bytes"),
    ],
)
def test_malformed_public_keys_are_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_public_key(text)


def test_format_refuses_wrong_sizes():
    with pytest.raises(ValueError, match="32 bytes"):
        format_public_key(b"\x01" * 31)


def test_signatures_verify_and_forgeries_do_not():
    alice, mallory = Identity.generate(), Identity.generate()
    signature = alice.sign(b"message")
    verify_signature(alice.public_key, signature, b"message")
    with pytest.raises(BadSignatureError):
        verify_signature(alice.public_key, signature, b"messagE")
    with pytest.raises(BadSignatureError):
        verify_signature(alice.public_key, mallory.sign(b"message"), b"message")
    with pytest.raises(BadSignatureError, match="cannot be Ed25519"):
        verify_signature(alice.public_key, signature[:-1], b"message")
    error = pytest.raises(BadSignatureError, verify_signature, alice.public_key, bytes(64), b"m").value
    assert isinstance(error, AuthError) and isinstance(error, SyncError) and error.code == "bad_signature"


# -- trust list ----------------------------------------------------------------------------


def test_trust_list_add_replace_list_remove(db):
    laptop, phone = Identity.generate(), Identity.generate()
    assert trusted_peers(db) == [] and find_trusted(db, laptop.public_key) is None
    entry = trust_peer(db, laptop.public_text, name="laptop", can="write", tables=["topics", "events"])
    assert entry.can is Grant.WRITE and entry.tables == ("events", "topics")
    trust_peer(db, phone.public_key, name="phone", can=Grant.READ)
    assert [e.name for e in trusted_peers(db)] == ["laptop", "phone"]
    found = find_trusted(db, laptop.public_key)
    assert found.tables == ("events", "topics") and found.public_key == laptop.public_text
    assert found.raw_key == laptop.public_key
    trust_peer(db, laptop.public_text, name="laptop2", can="read")  # re-trust replaces
    assert find_trusted(db, laptop.public_key).can is Grant.READ
    assert find_trusted(db, laptop.public_key).tables == ()
    assert untrust_peer(db, laptop.public_text) == 1
    assert untrust_peer(db, laptop.public_text) == 0
    assert [e.name for e in trusted_peers(db)] == ["phone"]


def test_untrust_on_a_replica_that_never_trusted_anyone(db):
    assert untrust_peer(db, Identity.generate().public_text) == 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(name="", can="write"), "needs a name"),
        (dict(name="x", can="admin"), "unknown grant"),
        (dict(name="x", can="write", tables=["no_such_table"]), "no replicated table named 'no_such_table'"),
        (dict(name="x", can="write", tables=["__sync_trust"]), "no replicated table"),
        (dict(name="x", can="read", tables=["topics"]), "limits writes"),
    ],
)
def test_bad_trust_entries_are_refused_and_nothing_is_stored(db, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        trust_peer(db, Identity.generate().public_text, **kwargs)
    assert trusted_peers(db) == []


def test_a_malformed_key_cannot_be_trusted(db):
    with pytest.raises(ValueError, match="not a public key"):
        trust_peer(db, "ed25519:nope", name="x", can="read")


# -- authorization -------------------------------------------------------------------------


def test_writers_write_allowed_tables_only(db):
    key = Identity.generate().public_text
    everything = trust_peer(db, key, name="w", can="write")
    authorize_write(everything, {"topics", "events", "handler_runs"})
    limited = trust_peer(db, key, name="w", can="write", tables=["events"])
    authorize_write(limited, ["events"])
    authorize_write(limited, [])
    with pytest.raises(NotAuthorizedError) as refused:
        authorize_write(limited, ["events", "topics", "handler_runs"])
    assert refused.value.table == "handler_runs" and refused.value.peer_name == "w"
    assert "may not write table 'handler_runs'" in str(refused.value)
    assert refused.value.code == "not_authorized" and refused.value.permanent


def test_readers_never_write(db):
    reader = trust_peer(db, Identity.generate().public_text, name="r", can="read")
    for tables in (["topics"], []):
        with pytest.raises(NotAuthorizedError, match="may only read"):
            authorize_write(reader, tables)


# -- wire codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, code, permanent",
    [
        ("MalformedChallengeError", "bad_challenge", False),
        ("UnknownPeerError", "unknown_peer", True),
        ("UntrustedServerError", "untrusted_server", True),
        ("BadSignatureError", "bad_signature", True),
        ("ReplayError", "replay", False),
        ("ExpiredChallengeError", "expired_challenge", False),
        ("NotAuthorizedError", "not_authorized", True),
    ],
)
def test_each_auth_error_has_a_wire_code_and_comes_back_as_itself(cls, code, permanent):
    from sync import errors

    local = getattr(errors, cls)
    assert local.code == code and local.permanent is permanent
    received = errors.refusal(code, "why", peer="p")
    assert isinstance(received, local) and isinstance(received, errors.PeerRefusedError)
    assert received.code == code and received.permanent is permanent and received.remote_message == "why"
    assert cls in errors.__all__ and cls in errors.__doc__


def test_tls_error_is_a_permanent_transport_error():
    from sync.errors import TLSError, TransportError

    error = TLSError("x", url="wss://h:1")
    assert isinstance(error, TransportError) and error.permanent and error.url == "wss://h:1"


def test_a_clone_gets_a_key_of_its_own(tmp_path):
    with Database.open(tmp_path / "original.db") as original:
        key = load_identity(original).public_key
        trust_peer(original, Identity.generate().public_text, name="hub", can="read")
        original.clone_to(tmp_path / "clone.db")
    with Database.open(tmp_path / "clone.db") as clone:
        assert load_identity(clone, create=False) is None  # the copied key is the original's
        own = load_identity(clone).public_key
        assert own != key and load_identity(clone).public_key == own
        assert [e.name for e in trusted_peers(clone)] == ["hub"]  # the trust list comes along
    with Database.open(tmp_path / "original.db") as original:
        assert load_identity(original).public_key == key
