"""The cr-sqlite behaviours the design relies on (DESIGN.md §3), checked on the built extension."""

from __future__ import annotations

import apsw
import pytest

from engine.database import close_connection, connect

CHANGE_COLUMNS = '"table", pk, cid, val, col_version, db_version, site_id, cl, seq'


def changes(db, since=0):
    return db.connection.execute(
        f"SELECT {CHANGE_COLUMNS} FROM crsql_changes WHERE db_version > ? ORDER BY db_version, seq", (since,)
    ).fetchall()


def merge(source, target, since=0):
    rows = changes(source, since)
    with target.transaction() as tx:
        tx.executemany(f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return tx.scalar("SELECT crsql_rows_impacted()")


def test_as_crr_refuses_not_null_without_default(tmp_path):
    connection = connect(str(tmp_path / "raw.db"))
    try:
        connection.execute("CREATE TABLE t (id TEXT NOT NULL PRIMARY KEY, a TEXT NOT NULL)")
        with pytest.raises(apsw.SQLError, match="NOT NULL column without a DEFAULT"):
            connection.execute("SELECT crsql_as_crr('t')").fetchall()
    finally:
        close_connection(connection)


def test_as_crr_refuses_unique_index(tmp_path):
    connection = connect(str(tmp_path / "raw.db"))
    try:
        connection.execute("CREATE TABLE t (id TEXT NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '')")
        connection.execute("CREATE UNIQUE INDEX t_a ON t (a)")
        with pytest.raises(apsw.SQLError, match="unique indices"):
            connection.execute("SELECT crsql_as_crr('t')").fetchall()
    finally:
        close_connection(connection)


def test_changes_have_the_documented_columns_and_local_site_id(db):
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name, created_at) VALUES ('t1', 'w', 'inbox', 5)")
    cursor = db.connection.execute("SELECT * FROM crsql_changes")
    names = [d[0] for d in cursor.getdescription()]
    rows = cursor.fetchall()
    assert names == ["table", "pk", "cid", "val", "col_version", "db_version", "site_id", "cl", "seq"]
    assert {(r[0], r[2], r[3]) for r in rows} == {
        ("topics", "workflow_id", "w"),
        ("topics", "name", "inbox"),
        ("topics", "created_at", 5),
    }
    assert {r[6].hex() for r in rows} == {db.site_id}
    assert {r[5] for r in rows} == {1} and {r[7] for r in rows} == {1}


def test_delete_is_one_change_with_sentinel_cid_and_even_causal_length(db):
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('t1', 'w', 'inbox')")
    with db.transaction() as tx:
        tx.execute("DELETE FROM topics WHERE id = 't1'")
    rows = changes(db)
    assert [(r[2], r[7] % 2) for r in rows] == [("-1", 0)]


def test_merge_into_second_database_and_idempotent_remerge(open_db):
    a, b = open_db("a"), open_db("b")
    with a.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('t1', 'w', 'inbox')")
        tx.execute("INSERT INTO handler_state (id, workflow_id, handler_name, state) VALUES ('h', 'w', 'x', '{\"n\":1}')")
    assert merge(a, b) == len(changes(a)) == 3 + 6  # every non-pk column of both rows
    assert b.connection.execute("SELECT id, workflow_id, name FROM topics").fetchall() == [("t1", "w", "inbox")]
    assert b.connection.execute("SELECT state FROM handler_state").fetchall() == [('{"n":1}',)]
    # merged changes keep their origin site id but get the receiver's db_version
    assert {r[6].hex() for r in changes(b)} == {a.site_id}
    assert merge(a, b) == 0, "re-merging known changes applies nothing"


def test_concurrent_writes_converge_deterministically(open_db):
    a, b = open_db("a"), open_db("b")
    for db, name in ((a, "from-a"), (b, "from-b")):
        with db.transaction() as tx:
            tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('t1', 'w', ?)", (name,))
    merge(a, b)
    merge(b, a)
    rows_a = a.connection.execute("SELECT * FROM topics").fetchall()
    assert rows_a == b.connection.execute("SELECT * FROM topics").fetchall()
    assert len(rows_a) == 1


def test_equal_row_on_two_databases_merges_and_closes_cleanly(tmp_path, clock):
    """Patch 06: merging an equal value at an equal version used to leave a statement open."""
    from engine import Database

    a = Database.open(tmp_path / "a.db", clock=clock)
    b = Database.open(tmp_path / "b.db", clock=clock)
    for db in (a, b):
        with db.transaction() as tx:
            tx.execute("INSERT INTO topics (id, workflow_id, name, created_at) VALUES ('same', 'w', 'inbox', 1)")
    merge(a, b)
    merge(b, a)
    a.close()
    b.close()  # raises apsw.ConnectionNotClosedError / BusyError without the patch
    assert a.closed and b.closed


def test_finalize_is_required_before_close(tmp_path):
    connection = connect(str(tmp_path / "raw.db"))
    connection.execute("CREATE TABLE t (id TEXT NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '')")
    connection.execute("SELECT crsql_as_crr('t')").fetchall()
    connection.execute("INSERT INTO t VALUES ('x', 'y')")
    with pytest.raises((apsw.BusyError, apsw.ConnectionNotClosedError)):
        connection.close()  # cr-sqlite's cached statements are still open


def test_finalize_then_close_succeeds(tmp_path):
    connection = connect(str(tmp_path / "raw.db"))
    connection.execute("CREATE TABLE t (id TEXT NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '')")
    connection.execute("SELECT crsql_as_crr('t')").fetchall()
    connection.execute("INSERT INTO t VALUES ('x', 'y')")
    close_connection(connection)
    with pytest.raises(apsw.ConnectionClosedError):
        connection.execute("SELECT 1")


def test_changes_counts_rows_of_crr_tables(db):
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, name) VALUES ('a', 'x'), ('b', 'y'), ('c', 'z')")
        assert tx.changes() == 3
        tx.execute("UPDATE topics SET name = 'q' WHERE id IN ('a', 'b')")
        assert tx.changes() == 2


def test_unpack_columns_recovers_primary_key(db):
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, name) VALUES ('it''s %; --', 'x')")
    pk = changes(db)[0][1]
    assert db.connection.execute("SELECT * FROM crsql_unpack_columns(?)", (pk,)).fetchall() == [("it's %; --",)]


def test_empty_text_and_blob_values_merge(open_db):
    """Patch 05: empty values used to build slices from NULL pointers."""
    a, b = open_db("a"), open_db("b")
    with a.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('', '', '')")
    merge(a, b)
    assert b.connection.execute("SELECT id, workflow_id, name FROM topics").fetchall() == [("", "", "")]


def _raw_crr(connection, table: str) -> None:
    connection.execute(f"CREATE TABLE {table} (id TEXT NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '')")
    connection.execute(f"SELECT crsql_as_crr('{table}')").fetchall()


def test_changes_query_sees_a_crr_created_after_an_earlier_query(tmp_path):
    """The UNION statement crsql_changes keeps prepared between queries (patch 07) is prepared
    again when the CRR tables change; a connection holding it still closes."""
    connection = connect(str(tmp_path / "raw.db"))
    try:
        _raw_crr(connection, "t1")
        connection.execute("INSERT INTO t1 (id, a) VALUES ('x', 'one')")
        query = 'SELECT "table", cid, val FROM crsql_changes WHERE db_version > ? ORDER BY db_version'
        assert connection.execute(query, (0,)).fetchall() == [("t1", "a", "one")]
        assert connection.execute(query, (0,)).fetchall() == [("t1", "a", "one")]  # the kept statement
        _raw_crr(connection, "t2")
        connection.execute("INSERT INTO t2 (id, a) VALUES ('y', 'two')")
        assert connection.execute(query, (0,)).fetchall() == [("t1", "a", "one"), ("t2", "a", "two")]
    finally:
        close_connection(connection)


def test_a_read_of_changes_closed_half_way_leaves_the_next_one_whole(tmp_path):
    connection = connect(str(tmp_path / "raw.db"))
    try:
        _raw_crr(connection, "t1")
        for i in range(5):
            connection.execute("INSERT INTO t1 (id, a) VALUES (?, ?)", (f"k{i}", f"v{i}"))
        query = "SELECT val FROM crsql_changes WHERE db_version > ? ORDER BY db_version"
        cursor = connection.execute(query, (0,))
        assert [next(cursor), next(cursor)] == [("v0",), ("v1",)]
        cursor.close()  # the kept statement is reset, not left half-read
        assert connection.execute(query, (1,)).fetchall() == [("v1",), ("v2",), ("v3",), ("v4",)]
    finally:
        close_connection(connection)
