"""The database layer: opening, facts, transactions, savepoints, isolation, locking, the clock."""

from __future__ import annotations

import re
import threading

import pytest

from engine import Database, EngineError, ExtensionNotFoundError, ManualClock
from engine.clock import SystemClock


def topic_ids(db):
    return [r[0] for r in db.connection.execute("SELECT id FROM topics ORDER BY id").fetchall()]


def insert_topic(tx, id):
    tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'w', ?)", (id, id))


def test_open_reports_site_id_versions_and_path(db, tmp_path):
    assert re.fullmatch(r"[0-9a-f]{32}", db.site_id)
    assert db.db_version == 0
    assert db.schema_version == 3
    assert db.path == str(tmp_path / "db.db")
    assert db.crr_tables == [
        "conflicts", "events", "handler_runs", "handler_state", "mutations", "ownership", "topics",
    ]
    assert db.connection.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
    assert db.connection.execute("PRAGMA synchronous").fetchall() == [(1,)]  # NORMAL


def test_site_id_survives_reopen(open_db):
    first = open_db("a")
    site = first.site_id
    first.close()
    assert open_db("a").site_id == site


def test_memory_database_works(clock):
    with Database.open(":memory:", clock=clock) as db:
        with db.transaction() as tx:
            insert_topic(tx, "t1")
        assert topic_ids(db) == ["t1"]
        assert db.db_version == 1


def test_commit_makes_writes_durable_and_bumps_db_version(open_db):
    db = open_db("a")
    with db.transaction() as tx:
        insert_topic(tx, "t1")
        insert_topic(tx, "t2")
    assert db.db_version == 1  # one transaction, one db_version
    db.close()
    assert topic_ids(open_db("a")) == ["t1", "t2"]


def test_rollback_on_exception_leaves_nothing(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            insert_topic(tx, "t1")
            raise RuntimeError("boom")
    assert topic_ids(db) == []
    assert db.db_version == 0


def test_nested_transaction_is_a_savepoint(db):
    with db.transaction() as tx:
        insert_topic(tx, "outer")
        with pytest.raises(ValueError):
            with db.transaction(tx) as inner:
                insert_topic(inner, "inner")
                raise ValueError
        with db.transaction(tx) as kept:
            insert_topic(kept, "kept")
    assert topic_ids(db) == ["kept", "outer"]


def test_outer_rollback_undoes_released_savepoints(db):
    with pytest.raises(KeyError):
        with db.transaction() as tx:
            with db.transaction(tx) as inner:
                insert_topic(inner, "inner")
            raise KeyError
    assert topic_ids(db) == []


def test_tx_of_another_database_is_refused(open_db):
    a, b = open_db("a"), open_db("b")
    with a.transaction() as tx:
        with pytest.raises(EngineError, match="another database"):
            with b.transaction(tx):
                pass


def test_uncommitted_writes_are_invisible_to_a_second_connection(open_db):
    writer, reader = open_db("shared"), open_db("shared")
    with writer.transaction() as tx:
        insert_topic(tx, "t1")
        assert topic_ids(writer) == ["t1"]
        assert topic_ids(reader) == []
    assert topic_ids(reader) == ["t1"]


def test_reader_is_not_blocked_by_an_open_write_transaction(open_db):
    writer, reader = open_db("shared"), open_db("shared")
    with writer.transaction() as tx:
        insert_topic(tx, "t1")
        with reader.reading() as r:  # WAL: returns at once with the committed snapshot
            assert r.execute("SELECT count(*) FROM topics") == [(0,)]


def test_busy_writer_waits_instead_of_failing(open_db):
    first, second = open_db("shared"), open_db("shared")
    entered, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second_writer():
        try:
            entered.set()
            with second.transaction() as tx:
                insert_topic(tx, "from-second")
        except BaseException as error:  # reported below
            errors.append(error)
        finished.set()

    with first.transaction() as tx:
        insert_topic(tx, "from-first")
        thread = threading.Thread(target=second_writer)
        thread.start()
        entered.wait(5)
        # the second writer is blocked on the lock while we hold it
        assert not finished.wait(0.3)  # sleep-ok: proves the second writer is still waiting
    thread.join(10)
    assert errors == []
    assert topic_ids(first) == ["from-first", "from-second"]


def test_threads_share_one_database_without_seeing_partial_transactions(db):
    seen: list[int] = []

    def writer(n):
        with db.transaction() as tx:
            insert_topic(tx, f"{n}-a")
            insert_topic(tx, f"{n}-b")

    def reader():
        for _ in range(50):
            with db.reading() as r:
                seen.append(r.scalar("SELECT count(*) FROM topics"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(topic_ids(db)) == 16
    assert all(count % 2 == 0 for count in seen), "a reader saw half of a transaction"


def test_on_commit_listener_runs_after_commit_only(db):
    calls = []
    remove = db.on_commit(lambda: calls.append(db.db_version))
    with db.transaction() as tx:
        insert_topic(tx, "t1")
        with db.transaction(tx) as inner:
            insert_topic(inner, "t2")
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            insert_topic(tx, "t3")
            raise RuntimeError
    remove()
    with db.transaction() as tx:
        insert_topic(tx, "t4")
    assert calls == [1]


def test_closed_database_refuses_use_and_close_is_idempotent(open_db):
    db = open_db("a")
    db.close()
    db.close()
    assert db.closed
    with pytest.raises(EngineError, match="closed"):
        with db.transaction():
            pass


def test_missing_extension_says_how_to_build_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "crsqlite.so"
    with pytest.raises(ExtensionNotFoundError, match="make extension") as info:
        Database.open(tmp_path / "x.db", extension=missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv("CRSQLITE_PATH", str(missing))
    with pytest.raises(ExtensionNotFoundError, match="CRSQLITE_PATH"):
        Database.open(tmp_path / "y.db")


def test_manual_clock_moves_only_when_told():
    clock = ManualClock(start_ms=10)
    assert clock.now_ms() == 10
    assert clock.advance(5) == 15
    clock.set(100)
    assert clock.now_ms() == 100
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_system_clock_is_integer_milliseconds():
    now = SystemClock().now_ms()
    assert isinstance(now, int) and now > 1_600_000_000_000


def test_schema_fingerprint_is_equal_for_equal_schemas(open_db):
    assert open_db("a").schema_fingerprint == open_db("b").schema_fingerprint


def test_a_failing_commit_listener_does_not_fail_the_committed_transaction(db, caplog):
    def broken():
        raise RuntimeError("listener bug")

    db.on_commit(broken)
    with db.transaction() as tx:
        insert_topic(tx, "t1")
    assert topic_ids(db) == ["t1"]
    assert "commit listener" in caplog.text


def test_a_read_sees_one_snapshot_while_another_connection_commits(open_db):
    reader, writer = open_db("shared"), open_db("shared")
    with reader.reading() as r:
        before = r.scalar("SELECT count(*) FROM topics")
        with writer.transaction() as tx:
            insert_topic(tx, "t1")
        assert r.scalar("SELECT count(*) FROM topics") == before == 0
    assert topic_ids(reader) == ["t1"]
