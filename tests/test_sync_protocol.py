"""Bad input: every kind gets the right typed Error reply and a log line, nothing is applied,
and nothing crashes (malformed pk blobs would abort the process inside cr-sqlite)."""

from __future__ import annotations

import logging
import shutil

import apsw
import msgspec
import pytest

from engine import Database
from engine.migrations import DEFAULT_MIGRATIONS_DIR
from sync import (
    AuthError,
    InvalidChangeError,
    MessageTooLargeError,
    Peer,
    PeerRefusedError,
    ProtocolError,
    SchemaMismatchError,
)
from sync.changes import CHANGE_COLUMNS, Limits, unpack_pk
from sync.protocol import Ack, Changes, Error, Hello, Pull, decode, encode
from test_sync_support import state, topic

raw = msgspec.msgpack.encode


def hello(db: Database, **fields) -> bytes:
    values = dict(site_id=db.site_id, schema_version=db.schema_version, fingerprint=db.schema_fingerprint,
                  db_version=db.db_version)
    values.update(fields)
    return encode(Hello(**values))


def changes_of(db: Database) -> list[tuple]:
    with db.reading() as s:
        return s.execute(f"SELECT {CHANGE_COLUMNS} FROM crsql_changes ORDER BY db_version")


@pytest.fixture
def setup(open_db):
    """A server replica `b` (empty) and a client replica `a` holding one topic."""
    a, b = open_db("a"), open_db("b")
    topic(a, "t1", "x")
    return a, b, Peer(b, token="s3cret")


def reply_error(out: list[bytes]) -> Error:
    assert len(out) == 1
    message = decode(out[0])
    assert isinstance(message, Error)
    return message


def assert_untouched(b: Database) -> None:
    assert state(b) == []
    with b.reading() as s:
        assert s.execute("SELECT * FROM __sync_peers") == []
        assert s.scalar("SELECT count(*) FROM crsql_changes") == 0


def open_server(a: Database, peer: Peer):
    server = peer.session("server")
    out = server.receive(hello(a, token="s3cret"))
    assert isinstance(decode(out[0]), Hello)
    return server


# -- the envelope ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "truncated"),
        (b"\x00\xffgarbage", "malformed"),
        (raw([1, ["hello", 123, 1, "fp", 0]]), "Expected `str`"),
        (raw([1, ["launch", 1]]), "Invalid value 'launch'"),
        (raw([99, ["ack", 1, 0, 1]]), "unsupported protocol version 99"),
        (raw({"v": 1}), "Expected `array`"),
        (raw([1, ["error", "x", "y"]]).replace(b"\xa1y", b"\xa1\xff"), "utf-8"),
        ("a text frame", "expected a binary message"),
    ],
    ids=["empty", "garbage", "wrong-type", "unknown-tag", "future-version", "not-an-envelope", "bad-utf8", "text"],
)
def test_malformed_messages_get_a_protocol_error(setup, caplog, data, fragment):
    a, b, peer = setup
    server = peer.session("server")
    with caplog.at_level(logging.WARNING, logger="sync"):
        error = reply_error(server.receive(data))
    assert error.code == "protocol" and fragment in error.message
    assert server.failed and isinstance(server.error, ProtocolError)
    assert any("replying with an error" in r.getMessage() for r in caplog.records)
    assert server.receive(hello(a, token="s3cret")) == []  # a failed session answers nothing more
    assert_untouched(b)


def test_truncated_message(setup):
    a, b, peer = setup
    error = reply_error(peer.session("server").receive(hello(a, token="s3cret")[:-3]))
    assert (error.code, error.message) == ("protocol", "malformed message envelope: Input data was truncated")


def test_oversized_message_is_refused_before_parsing(open_db):
    a, b = open_db("a"), open_db("b")
    server = Peer(b, limits=Limits(max_message_bytes=100)).session("server")
    error = reply_error(server.receive(hello(a, fingerprint="x" * 120)))
    assert error.code == "too_large" and "exceeds the limit of 100 bytes" in error.message
    assert isinstance(server.error, MessageTooLargeError) and server.error.size > 100


# -- the handshake -------------------------------------------------------------------------

@pytest.mark.parametrize("token, message", [("wrong", "the presented token is wrong"),
                                            (None, "this peer requires a token and none was presented")])
def test_wrong_or_missing_token_is_refused_before_anything_is_read(setup, token, message):
    a, b, peer = setup
    server = peer.session("server")
    error = reply_error(server.receive(hello(a, token=token, fingerprint="not even checked")))
    assert (error.code, error.message) == ("auth", message)
    assert isinstance(server.error, AuthError) and server.remote is None
    assert_untouched(b)


def test_sync_with_a_wrong_token_raises_auth_error(setup):
    a, b, peer = setup
    with pytest.raises(AuthError) as caught:
        Peer(a).sync_with(peer, token="guess")
    assert isinstance(caught.value, PeerRefusedError) and caught.value.code == "auth"
    assert caught.value.peer == "" and "token is wrong" in str(caught.value)
    assert_untouched(b)


def test_fingerprint_mismatch_is_refused(setup):
    a, b, peer = setup
    server = peer.session("server")
    error = reply_error(server.receive(hello(a, token="s3cret", fingerprint="0123456789abcdef")))
    assert error.code == "schema_mismatch" and "fingerprint 0123456789abcdef" in error.message
    assert server.error.remote_fingerprint == "0123456789abcdef"


def test_a_replica_with_another_schema_is_refused(open_db, tmp_path):
    """The real migrations plus one more: both sides see a clear schema mismatch."""
    folder = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, folder)
    (folder / "9000_extra.sql").write_text("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL DEFAULT '');")
    newer = open_db("newer", migrations=folder)
    older = open_db("older")
    topic(newer, "t1")
    with pytest.raises(SchemaMismatchError) as caught:
        Peer(older).sync_with(Peer(newer))
    assert isinstance(caught.value, PeerRefusedError)
    message = str(caught.value)
    assert f"replica {older.site_id} has schema version {older.schema_version} " in message
    assert f"replica {newer.site_id} has schema version 9000 " in message
    assert state(older) == []


def test_a_copied_database_with_the_same_site_id_is_refused(setup):
    a, b, peer = setup
    error = reply_error(peer.session("server").receive(hello(a, site_id=b.site_id, token="s3cret")))
    assert error.code == "duplicate_site" and "own site id" in error.message and "crdt-sync clone" in error.message


@pytest.mark.parametrize("message", [Pull(0), Ack(1, 0, 1), Changes(0, 1, [])], ids=["pull", "ack", "changes"])
def test_anything_before_hello_is_refused(setup, message):
    a, b, peer = setup
    error = reply_error(peer.session("server").receive(encode(message)))
    assert error.code == "protocol" and "expected hello first" in error.message
    assert_untouched(b)


def test_a_second_hello_is_refused(setup):
    a, b, peer = setup
    server = open_server(a, peer)
    error = reply_error(server.receive(hello(a, token="s3cret")))
    assert error.code == "protocol" and "unexpected hello" in error.message


def test_an_ack_for_a_page_never_sent_is_refused(setup):
    a, b, peer = setup
    server = open_server(a, peer)
    server.receive(encode(Pull(0)))
    error = reply_error(server.receive(encode(Ack(50, 0, 50))))
    assert error.code == "protocol" and "never sent" in error.message


# -- pages ---------------------------------------------------------------------------------

def _bad_pages(a: Database, b: Database) -> dict[str, tuple[list, str, str]]:
    good = [list(r) for r in changes_of(a)]
    upto = a.db_version

    def variant(index: int, column: int, value) -> list:
        rows = [list(r) for r in good]
        rows[index][column] = value
        return rows

    return {
        "unknown-table": (variant(-1, 0, "secrets"), "invalid_change", "unknown table 'secrets'"),
        "unknown-column": (variant(-1, 2, "password"), "invalid_change", "unknown column topics.password"),
        "pk-column-as-cid": (variant(-1, 2, "id"), "invalid_change", "unknown column topics.id"),
        "empty-pk": (variant(-1, 1, b""), "protocol", "length >= 2"),
        "truncated-pk": (variant(-1, 1, b"\x01\x0b\x05t1"), "invalid_change", "truncated text/blob in pk"),
        "two-column-pk": (variant(-1, 1, b"\x02\x0b\x01x\x09\x01"), "invalid_change", "has 2 columns, the table has 1"),
        "zero-column-pk": (variant(-1, 1, b"\x00\x00"), "invalid_change", "zero columns"),
        "trailing-pk": (variant(-1, 1, b"\x01\x0b\x02t1zz"), "invalid_change", "trailing bytes"),
        "bad-type-pk": (variant(-1, 1, b"\x01\xff\x01"), "invalid_change", "bad column type byte 0xff"),
        "null-pk": (variant(-1, 1, b"\x01\x05"), "invalid_change", "bad column type byte 0x05"),
        "invalid-utf8-pk": (variant(-1, 1, b"\x01\x0b\x02\xff\xfe"), "invalid_change", "can't decode"),
        "list-value": (variant(-1, 3, [1, 2]), "invalid_change", "unsupported type list"),
        "huge-int": (variant(-1, 3, 2**64 - 1), "invalid_change", "64-bit integer range"),
        "short-site-id": (variant(-1, 6, b"\x01" * 15), "protocol", "length >= 16"),
        "negative-version": (variant(-1, 4, -1), "protocol", ">= 0"),
        "outside-range": (variant(-1, 5, upto + 7), "protocol", "holds changes of db_version"),
        "string-pk": (variant(-1, 1, "t1"), "protocol", "Expected `bytes`"),
        # a change that looks like the receiver's own write (merged as local, re-sent to all)
        "receivers-own-site-id": (variant(-1, 6, bytes.fromhex(b.site_id)), "invalid_change", "own site id"),
        # extreme clocks that would brick a column or row for good (see the test below)
        "max-col-version": (variant(-1, 4, 2**63 - 1), "invalid_change", "col_version 9223372036854775807 outside"),
        "max-cl": (variant(-1, 7, 2**63 - 1), "invalid_change", "cl 9223372036854775807 outside"),
        "zero-cl": (variant(-1, 7, 0), "invalid_change", "cl 0 outside 1..2**53"),
        "zero-col-version": (variant(-1, 4, 0), "invalid_change", "col_version 0 outside"),
        "huge-seq": (variant(-1, 8, 2**60), "invalid_change", "seq 1152921504606846976 outside"),
    }


BAD_PAGES = ["unknown-table", "unknown-column", "pk-column-as-cid", "empty-pk", "truncated-pk", "two-column-pk",
             "zero-column-pk", "trailing-pk", "bad-type-pk", "null-pk", "invalid-utf8-pk", "list-value",
             "huge-int", "short-site-id", "negative-version", "outside-range", "string-pk",
             "receivers-own-site-id", "max-col-version", "max-cl", "zero-cl", "zero-col-version", "huge-seq"]


@pytest.mark.parametrize("kind", BAD_PAGES)
def test_a_bad_change_rejects_its_whole_page(setup, kind):
    a, b, peer = setup
    rows, code, fragment = _bad_pages(a, b)[kind]
    server = open_server(a, peer)
    page = raw([1, ["changes", 0, a.db_version, rows, 0, False, True]])
    error = reply_error(server.receive(page))
    assert error.code == code and fragment in error.message, error.message
    assert isinstance(server.error, InvalidChangeError if code == "invalid_change" else ProtocolError)
    assert_untouched(b)  # the valid rows before the bad one were not applied either


@pytest.mark.parametrize("column, value, breaks", [
    ("col_version", 2**63 - 1, "UPDATE topics SET name = 'later' WHERE id = 't1'"),
    ("cl", 2**63 - 1, "DELETE FROM topics WHERE id = 't1'"),
])
def test_cr_sqlite_itself_is_bricked_by_extreme_clocks_which_is_why_pages_bound_them(open_db, column, value, breaks):
    """The reproduction behind the clock bounds: merged straight into crsql_changes (no sync
    validation), such a change makes every later local write of that column/row fail."""
    a, victim = open_db("a"), open_db("victim")
    topic(a, "t1", "x")
    rows = [list(r) for r in changes_of(a)]
    index = CHANGE_COLUMNS.replace('"', "").split(", ").index(column)
    for row in rows:
        row[index] = value
    with victim.transaction() as tx:
        tx.executemany(f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    with pytest.raises(apsw.Error):
        with victim.transaction() as tx:
            tx.execute(breaks)


def test_a_forged_change_with_the_receivers_site_id_is_never_merged_over_a_live_link(open_db):
    """End to end: the server refuses the page; the client's data is unchanged, nothing re-sent."""
    a, b = open_db("a"), open_db("b")
    topic(b, "t1", "mine")
    forged = [list(r) for r in changes_of(b)]
    for row in forged:
        row[3] = "forged" if row[2] == "name" else row[3]
        row[4] = 99  # would win every LWW comparison
    peer = Peer(b)
    server = peer.session("server")
    server.receive(hello(a))
    error = reply_error(server.receive(raw([1, ["changes", 0, 5, forged, 0, False, True]])))
    assert error.code == "invalid_change" and "own site id" in error.message
    assert state(b)[0][2] == "mine"


def test_a_page_after_a_gap_is_refused(setup):
    a, b, peer = setup
    server = open_server(a, peer)
    rows = [r for r in changes_of(a)]
    error = reply_error(server.receive(encode(Changes(since=3, upto=5, rows=[r[:5] + (4,) + r[6:] for r in rows]))))
    assert error.code == "protocol" and "holds its changes only up to 0: a gap" in error.message
    assert_untouched(b)


def test_a_valid_page_is_applied_and_acknowledged(setup):
    """The control for the tests above: the same handshake with good rows merges them."""
    a, b, peer = setup
    server = open_server(a, peer)
    out = server.receive(encode(Changes(since=0, upto=a.db_version, rows=changes_of(a), caught_up=True)))
    assert [decode(m) for m in out] == [Ack(upto=1, part=0, watermark=1, applied=3)]
    assert state(b) == state(a)
    duplicate = server.receive(encode(Changes(since=0, upto=a.db_version, rows=changes_of(a))))
    assert [decode(m) for m in duplicate] == [Ack(upto=1, part=0, watermark=1, applied=0)]


def test_a_client_answers_garbage_from_the_server_with_an_error(setup):
    a, b, peer = setup
    client = Peer(a).session("client", token="s3cret")
    client.start()
    error = reply_error(client.receive(b"\xc1\xc1"))
    assert error.code == "protocol" and client.failed
    with pytest.raises(ProtocolError):
        client.raise_for_error()


def test_a_refusal_received_is_raised_with_its_code(setup):
    a, b, peer = setup
    client = Peer(a).session("client")
    client.start()
    assert client.receive(encode(Error("invalid_change", "change for unknown table 'x'"))) == []
    assert client.finished and isinstance(client.error, InvalidChangeError)
    assert isinstance(client.error, PeerRefusedError) and client.error.remote_message == "change for unknown table 'x'"
    unknown = Peer(a).session("client")
    unknown.receive(encode(Error("teapot", "short and stout")))
    assert type(unknown.error) is PeerRefusedError and unknown.error.code == "teapot"


def test_unpack_pk_reads_what_cr_sqlite_packs(db):
    values = [0, 1, -1, 127, 128, 255, 256, 2**31, -(2**31), 2**63 - 1, -(2**63), 1.5, -0.0, "", "x" * 300,
              "é☃", b"", b"\x00" * 70000]
    with db.reading() as s:
        for value in values:
            blob = s.scalar("SELECT crsql_pack_columns(?)", (value,))
            assert unpack_pk(blob) == tuple(r[0] for r in s.execute("SELECT * FROM crsql_unpack_columns(?)", (blob,)))
        blob = s.scalar("SELECT crsql_pack_columns(?, ?, ?)", ("a", 7, b"z"))
        assert unpack_pk(blob) == ("a", 7, b"z")
