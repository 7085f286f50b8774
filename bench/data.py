"""The data every benchmark runs on: fresh temp replicas, generated event rows, source
replicas holding N changes, and the raw-copy baseline of the sync benchmarks.

Replicas are real: `engine.Database.open` on a file in a temp folder (real migrations, the
real extension, WAL), with a `ManualClock` so two runs write identical timestamps. They are
opened as a user opens them: with the after-merge conflict audit on (the default of
`Database.open`), so every sync row includes it; B3-audit measures what it adds to the same
sync (on vs `audit=False`).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import apsw
import msgspec

from engine import Database, ManualClock
from engine.migrations import DEFAULT_MIGRATIONS_DIR, discover

__all__ = [
    "Workspace",
    "EVENT_COLUMNS",
    "INSERT_EVENT",
    "CHANGES_PER_EVENT",
    "CHANGE_COLUMNS",
    "NOW_MS",
    "TOKEN",
    "WORKFLOW",
    "TOPIC",
    "payload",
    "event_rows",
    "plain_schema",
    "raw_copy",
    "count_changes",
    "CRR_TABLES",
]

NOW_MS = 1_700_000_000_000
TOKEN = "bench-token"  # what every benchmark server demands
WORKFLOW, TOPIC = "wf-bench", "inbox"
CRR_TABLES = ("topics", "events", "handler_runs", "mutations", "handler_state")
EVENT_COLUMNS = ("id", "topic_id", "workflow_id", "message_id", "title", "payload", "status",
                 "reserved_by_run_id", "created_by_run_id", "attempt_number", "caused_by",
                 "created_at", "updated_at")
CHANGE_COLUMNS = '"table", pk, cid, val, col_version, db_version, site_id, cl, seq'
INSERT_EVENT = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
# A row of `events` becomes one change per non-key column.
CHANGES_PER_EVENT = len(EVENT_COLUMNS) - 1
_json = msgspec.json.Encoder()


def payload(i: int) -> dict:
    """A small, realistic event payload (about 70 bytes of JSON)."""
    return {"order": i, "status": "received", "amount_cents": i * 37 % 100_000, "currency": "EUR"}


def event_rows(count: int, *, start: int = 0, topic_id: str = "t-bench") -> list[tuple]:
    """`count` complete `events` rows (all 13 columns, in table order) with distinct ids."""
    return [
        (f"ev{i:09d}", topic_id, WORKFLOW, f"m{i:09d}", "", _json.encode(payload(i)).decode(), "pending",
         "", "", 1, "[]", NOW_MS, NOW_MS)
        for i in range(start, start + count)
    ]


class Workspace:
    """A temp folder of replica files, removed on close. `fresh()` opens a new replica;
    `source(n)` builds (once) a replica holding about n changes, for the sync benchmarks."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="crdt-bench-"))
        self._names = itertools.count()
        self._sources: dict[tuple[int, int], Database] = {}

    def path(self, stem: str) -> Path:
        return self.folder / f"{stem}-{next(self._names)}.db"

    def fresh(self, stem: str = "replica", *, audit: bool = True) -> Database:
        return self.open_path(self.path(stem), audit=audit)

    def open_path(self, path: Path | str, *, audit: bool = True) -> Database:
        """Open (creating) the replica at `path` with the benchmarks' manual clock."""
        return Database.open(path, clock=ManualClock(start_ms=NOW_MS), audit=audit)

    def discard(self, db: Database) -> None:
        """Close a replica and delete its files (keeps the temp folder small)."""
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(db.path + suffix).unlink(missing_ok=True)

    def source(self, changes: int, rows_per_tx: int = 100) -> Database:
        """A replica holding `changes` changes (rounded up to whole event rows), written as
        many transactions of `rows_per_tx` rows each — the shape of an app's history."""
        key = (changes, rows_per_tx)
        if key not in self._sources:
            db = self.fresh(f"source{changes}")
            rows = -(-changes // CHANGES_PER_EVENT)
            connection = db.connection
            for start in range(0, rows, rows_per_tx):
                connection.execute("BEGIN IMMEDIATE")
                for _ in connection.executemany(INSERT_EVENT, event_rows(min(rows_per_tx, rows - start), start=start)):
                    pass
                connection.execute("COMMIT")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # read from the main file
            self._sources[key] = db
        return self._sources[key]

    def close(self) -> None:
        for db in self._sources.values():
            db.close()
        self._sources.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plain_schema(path: Path) -> apsw.Connection:
    """A plain APSW connection (no cr-sqlite) with the project's schema, made by executing the
    migration files themselves, never a copy of them, and the same pragmas as a replica."""
    connection = apsw.Connection(str(path))
    connection.execute("PRAGMA journal_mode = WAL").fetchall()
    connection.execute("PRAGMA synchronous = NORMAL").fetchall()
    for migration in discover(DEFAULT_MIGRATIONS_DIR):
        for _ in connection.execute(migration.sql):
            pass
    return connection


def raw_copy(source: Database, target: Database) -> None:
    """The sync baseline: every change of `source` the target lacks, read from
    `crsql_changes` with one SELECT (fetchall) and merged with one
    `executemany(INSERT INTO crsql_changes)` in one transaction.

    fetchall, not a cursor streamed into executemany: measured here, interleaving the two
    connections row by row is 10-40% slower, and the baseline must be the fastest raw copy.
    It holds every change in memory at once (see B6-rss: that is the price)."""
    site = target.connection.execute("SELECT crsql_site_id()").fetchall()[0][0]
    # Through the databases' own locks: a sync server may share `source` from other threads.
    with source.reading() as s:
        rows = s.connection.execute(
            f"SELECT {CHANGE_COLUMNS} FROM crsql_changes WHERE db_version > ? AND site_id IS NOT ?", (0, site)
        ).fetchall()
    with target.transaction() as tx:
        for _ in tx.connection.executemany(
                f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows):
            pass


def count_changes(db: Database) -> int:
    return db.connection.execute("SELECT count(*) FROM crsql_changes").fetchall()[0][0]
