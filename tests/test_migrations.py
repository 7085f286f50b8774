"""The migration runner on the real migrations, plus the refusals it owes a broken migration."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest

from engine import Database, SchemaError
from engine.migrations import DEFAULT_MIGRATIONS_DIR, discover


@pytest.fixture
def migrations_dir(tmp_path):
    """A copy of the project's migrations that a test may extend with one more file."""
    folder = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, folder)
    return folder


def latest_version():
    return discover(DEFAULT_MIGRATIONS_DIR)[-1].version


def indexes(db, table):
    return sorted(
        r[0]
        for r in db.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,)
        )
    )


def test_fresh_database_gets_every_table_as_crr_with_indexes(db):
    assert db.schema_version == latest_version()
    assert {"topics", "events", "handler_runs", "mutations", "handler_state"} <= set(db.crr_tables)
    assert indexes(db, "events") == ["events_reserved_by", "events_topic_status", "events_workflow"]
    assert indexes(db, "handler_runs") == [
        "handler_runs_phase",
        "handler_runs_retry_of",
        "handler_runs_script_run",
        "handler_runs_status",
        "handler_runs_workflow",
    ]
    assert indexes(db, "handler_state") == ["handler_state_wake_at", "handler_state_workflow"]


def test_every_column_is_not_null_with_default(db):
    for table in db.crr_tables:
        for _cid, name, _type, notnull, default, pk in db.connection.execute(f"PRAGMA table_info({table})"):
            assert notnull, f"{table}.{name} is nullable"
            assert pk or default is not None, f"{table}.{name} has no default"


def test_rerunning_is_a_no_op(open_db):
    first = open_db("a")
    recorded = first.connection.execute("SELECT version, name, applied_at FROM __engine_migrations").fetchall()
    first.close()
    again = open_db("a")
    assert again.connection.execute("SELECT version, name, applied_at FROM __engine_migrations").fetchall() == recorded
    assert again.db_version == 0


def test_applied_versions_are_recorded_with_the_clock(db, clock):
    rows = db.connection.execute("SELECT version, name, applied_at FROM __engine_migrations").fetchall()
    assert rows[0] == (1, "0001_execution_stores", clock.now_ms())


def test_newer_database_is_refused(open_db):
    db = open_db("a")
    db.connection.execute("INSERT INTO __engine_migrations VALUES (9999, '9999_future', 0)")
    db.close()
    with pytest.raises(SchemaError, match="schema version 9999, newer than this code"):
        open_db("a")


@pytest.mark.parametrize(
    "sql, message, column_or_index",
    [
        ("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL)",
         "table notes: column body is NOT NULL without a DEFAULT", "body"),
        ("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL DEFAULT '');"
         "CREATE UNIQUE INDEX notes_body ON notes (body)",
         "table notes: unique index notes_body is not allowed", "notes_body"),
        ("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL DEFAULT '' UNIQUE)",
         "table notes: unique index sqlite_autoindex_notes_2 is not allowed", "sqlite_autoindex_notes_2"),
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL DEFAULT '')",
         "table notes: AUTOINCREMENT is not allowed", ""),
        ("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT NOT NULL DEFAULT '')",
         "table notes: primary key column id must be NOT NULL", "id"),
        ("CREATE TABLE notes (body TEXT NOT NULL DEFAULT '')",
         "table notes: a CRR needs an explicit primary key", ""),
        ("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, created_at TEXT NOT NULL DEFAULT '')",
         "table notes: timestamp column created_at must be INTEGER milliseconds", "created_at"),
    ],
)
def test_incompatible_table_is_refused_naming_table_and_column(open_db, migrations_dir, sql, message, column_or_index):
    (migrations_dir / "0100_notes.sql").write_text(sql)
    with pytest.raises(SchemaError) as info:
        open_db("a", migrations=migrations_dir)
    assert message in str(info.value)
    assert info.value.table == "notes"
    assert column_or_index in (info.value.column, info.value.index)
    # the earlier migrations stayed applied, the broken one left nothing behind
    (migrations_dir / "0100_notes.sql").unlink()
    db = open_db("a", migrations=migrations_dir)
    assert db.schema_version == latest_version()
    assert "notes" not in [r[0] for r in db.connection.execute("SELECT name FROM sqlite_master")]


def test_a_new_table_becomes_a_crr(open_db, migrations_dir):
    (migrations_dir / "0100_notes.sql").write_text(
        "CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL DEFAULT 0)"
    )
    db = open_db("a", migrations=migrations_dir)
    assert db.schema_version == 100
    assert "notes" in db.crr_tables


def test_dropping_a_crr_table_is_refused(open_db, migrations_dir):
    (migrations_dir / "0100_drop.sql").write_text("DROP TABLE topics")
    with pytest.raises(SchemaError, match="drops CRR table topics"):
        open_db("a", migrations=migrations_dir)


def test_failing_sql_names_the_migration(open_db, migrations_dir):
    (migrations_dir / "0100_broken.sql").write_text("CREATE TABLE (")
    with pytest.raises(SchemaError, match="migration 0100_broken failed"):
        open_db("a", migrations=migrations_dir)


def test_misnamed_and_duplicate_files_are_refused(open_db, migrations_dir):
    (migrations_dir / "notes.sql").write_text("SELECT 1")
    with pytest.raises(SchemaError, match="notes.sql is not named NNNN_name.sql"):
        open_db("a", migrations=migrations_dir)
    (migrations_dir / "notes.sql").unlink()
    (migrations_dir / "0001_again.sql").write_text("SELECT 1")
    with pytest.raises(SchemaError, match="two migrations have version 1"):
        open_db("a", migrations=migrations_dir)


def _open_and_report(path, queue):
    try:
        with Database.open(path) as db:
            queue.put(db.schema_version)
    except BaseException as error:  # reported through the queue so the assertion shows it
        queue.put(repr(error))


def test_two_processes_opening_a_fresh_file_apply_each_migration_once(tmp_path):
    path = str(tmp_path / "race.db")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_open_and_report, args=(path, queue)) for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [queue.get(timeout=30) for _ in processes] == [latest_version()] * 2
    with Database.open(path) as db:
        assert db.connection.execute("SELECT count(*) FROM __engine_migrations").fetchall() == [(latest_version(),)]


def test_altering_a_crr_table_between_begin_and_commit_alter_replicates_the_new_column(open_db, migrations_dir):
    (migrations_dir / "0100_color.sql").write_text(
        "SELECT crsql_begin_alter('topics');\n"
        "ALTER TABLE topics ADD COLUMN color TEXT NOT NULL DEFAULT '';\n"
        "SELECT crsql_commit_alter('topics');\n"
    )
    db = open_db("a", migrations=migrations_dir)
    assert db.schema_version == 100
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, name, color) VALUES ('t1', 'inbox', 'red')")
    assert db.connection.execute("SELECT val FROM crsql_changes WHERE cid = 'color'").fetchall() == [("red",)]


def test_altering_a_crr_table_outside_begin_and_commit_alter_is_refused(open_db, migrations_dir):
    (migrations_dir / "0100_color.sql").write_text("ALTER TABLE topics ADD COLUMN color TEXT NOT NULL DEFAULT ''")
    with pytest.raises(SchemaError, match=r"alters CRR table topics without SELECT crsql_begin_alter\('topics'\)") as info:
        open_db("a", migrations=migrations_dir)
    assert info.value.table == "topics"
    (migrations_dir / "0100_color.sql").unlink()
    db = open_db("a", migrations=migrations_dir)
    assert "color" not in [r[1] for r in db.connection.execute("PRAGMA table_info(topics)")]


def test_a_unique_index_added_to_a_crr_table_later_is_refused(open_db, migrations_dir):
    (migrations_dir / "0100_unique.sql").write_text("CREATE UNIQUE INDEX topics_name ON topics (workflow_id, name)")
    with pytest.raises(SchemaError, match="table topics: unique index topics_name is not allowed") as info:
        open_db("a", migrations=migrations_dir)
    assert info.value.index == "topics_name"
