"""The database layer: one replica's SQLite file, opened through APSW with cr-sqlite loaded.

`Database` owns its connection: it loads the extension, sets the pragmas, runs the
migrations, serializes use of the connection across threads, offers `transaction()` with
nested savepoints, and calls `crsql_finalize()` before closing. Stores receive the database
and never open connections themselves.

    with Database.open("app.db") as db:
        with db.transaction() as tx:
            tx.execute("UPDATE topics SET name = ? WHERE id = ?", ("inbox", topic_id))
        print(db.site_id, db.db_version)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import apsw

from . import migrations as _migrations
from .clock import Clock, SystemClock
from .errors import EngineError, ExtensionNotFoundError
from .resources import data_path

__all__ = ["Database", "Session", "connect", "extension_path", "BUSY_TIMEOUT_MS"]

log = logging.getLogger("engine.database")

DEFAULT_EXTENSION = data_path("crsqlite.so", "extensions", "crsqlite.so")  # wheel's copy, else the checkout's
BUSY_TIMEOUT_MS = 10_000
_ENTRY_POINT = "sqlite3_crsqlite_init"


def extension_path(explicit: str | os.PathLike | None = None) -> str:
    """Where the cr-sqlite library is: the argument, else $CRSQLITE_PATH, else the copy inside
    the installed wheel, else extensions/crsqlite.so of the source checkout.

    Raises:
        ExtensionNotFoundError: the file is not there (the message says how to get one).
    """
    if explicit:
        path, source = Path(explicit), "extension="
    elif os.environ.get("CRSQLITE_PATH"):
        path, source = Path(os.environ["CRSQLITE_PATH"]), "CRSQLITE_PATH"
    else:
        path, source = DEFAULT_EXTENSION, ""
    if not path.is_file():
        raise ExtensionNotFoundError(str(path), source=source)
    return str(path)


def connect(path: str, extension: str | os.PathLike | None = None) -> apsw.Connection:
    """Open an APSW connection with cr-sqlite loaded and the replica pragmas set.

    Every connection to a replica file must come from here: cr-sqlite's triggers call
    functions that only exist on connections that loaded the extension.
    """
    library = extension_path(extension)
    connection = apsw.Connection(str(path))
    try:
        # The busy timeout comes first: cr-sqlite's init writes its own tables and would fail
        # at once if another connection were creating the same file.
        connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        connection.enable_load_extension(True)
        connection.load_extension(library, _ENTRY_POINT)
        connection.enable_load_extension(False)
        connection.execute("PRAGMA journal_mode = WAL").fetchall()
        connection.execute("PRAGMA synchronous = NORMAL").fetchall()
        connection.execute("SELECT crsql_config_set('merge-equal-values', 1)").fetchall()
    except BaseException:
        connection.close()
        raise
    return connection


def close_connection(connection: apsw.Connection) -> None:
    """Finalize cr-sqlite's cached statements, then close (APSW refuses otherwise)."""
    connection.execute("SELECT crsql_finalize()").fetchall()
    connection.close()


class Session:
    """What a transaction (or a read) hands out: the connection plus queries that always
    exhaust their cursor (an open cursor would keep the connection from closing)."""

    def __init__(self, db: "Database"):
        self.db = db
        self.connection: apsw.Connection = db.connection

    def execute(self, sql: str, params: Any = ()) -> list[tuple]:
        return self.connection.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Any) -> None:
        for _ in self.connection.executemany(sql, rows):
            pass

    def one(self, sql: str, params: Any = ()) -> tuple | None:
        rows = self.connection.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Any = ()) -> Any:
        rows = self.connection.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    def changes(self) -> int:
        """Rows changed by the last statement (correct for CRR tables too)."""
        return self.connection.changes()

    def now_ms(self) -> int:
        return self.db.clock.now_ms()


class Database:
    """One replica. Use `Database.open(path)`; close it (or use `with`) when done.

    Thread-safe: one re-entrant lock serializes use of the connection; a transaction holds
    it from BEGIN to COMMIT, so other threads wait rather than see uncommitted writes.
    """

    def __init__(self, connection: apsw.Connection, *, path: str, clock: Clock, extension: str | None):
        self.connection = connection
        self.path = path
        self.clock = clock
        self.extension = extension
        self.schema_version = 0
        self._lock = threading.RLock()
        self._depth = 0
        self._session = Session(self)
        self._commit_listeners: list[Callable[[], None]] = []
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        clock: Clock | None = None,
        extension: str | os.PathLike | None = None,
        migrations: str | os.PathLike | None = None,
    ) -> "Database":
        """Open (creating if needed) the replica at `path` (":memory:" works) and migrate it.

        `migrations` is a folder of NNNN_name.sql files; the project's own by default.

        Raises:
            ExtensionNotFoundError: cr-sqlite is not built.
            SchemaError: a migration breaks a CRR rule, or the file is newer than the code.
        """
        path = str(path)
        connection = connect(path, extension)
        db = cls(connection, path=path, clock=clock or SystemClock(), extension=str(extension or "") or None)
        try:
            found = _migrations.discover(migrations or _migrations.DEFAULT_MIGRATIONS_DIR)
            db.schema_version = _migrations.migrate(connection, found, db.clock.now_ms(), path=path)
        except BaseException:
            close_connection(connection)
            raise
        return db

    # -- facts -------------------------------------------------------------------------

    @cached_property
    def site_id(self) -> str:
        """This replica's cr-sqlite site id, 32 lowercase hex characters."""
        with self._lock:
            return self._session.scalar("SELECT lower(hex(crsql_site_id()))")

    @property
    def db_version(self) -> int:
        """cr-sqlite's logical clock: the db_version of the latest committed change."""
        with self._lock:
            return self._session.scalar("SELECT crsql_db_version()")

    @property
    def crr_tables(self) -> list[str]:
        with self._lock:
            return _migrations.crr_tables(self.connection)

    @property
    def schema_fingerprint(self) -> str:
        """A short hash of the CRR tables and their columns: two replicas can merge changes
        only when these agree."""
        digest = hashlib.sha256()
        with self._lock:
            for table in _migrations.crr_tables(self.connection):
                digest.update(f"T{table}\0".encode())
                for _cid, name, decl_type, _nn, _default, pk in self._session.execute(f'PRAGMA table_info("{table}")'):
                    digest.update(f"C{name}\0{decl_type}\0{pk}\0".encode())
        return digest.hexdigest()[:16]

    @property
    def closed(self) -> bool:
        return self._closed

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def transaction(self, tx: Session | None = None) -> Iterator[Session]:
        """A write transaction: BEGIN IMMEDIATE, commit on success, rollback on exception.

        Nested on the same thread (or given a `tx` of this database) it is a SAVEPOINT, whose
        rollback undoes only itself. Store methods take `tx=` and pass it here.

        Raises:
            EngineError: the database is closed, or `tx` belongs to another database.
        """
        if tx is not None and tx.db is not self:
            raise EngineError("tx= belongs to another database")
        with self._lock:
            self._check_open()
            depth = self._depth
            savepoint = f"sp{depth}"
            execute = self.connection.execute
            execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
            self._depth = depth + 1
            try:
                yield self._session
            except BaseException:
                self._depth = depth
                if depth == 0:
                    if self.connection.in_transaction:
                        execute("ROLLBACK")
                else:
                    execute(f"ROLLBACK TO {savepoint}")
                    execute(f"RELEASE {savepoint}")
                raise
            self._depth = depth
            if depth:
                execute(f"RELEASE {savepoint}")
                return
            try:
                execute("COMMIT")
            except BaseException:
                if self.connection.in_transaction:
                    execute("ROLLBACK")
                raise
        self._notify_commit()

    @contextmanager
    def reading(self, tx: Session | None = None) -> Iterator[Session]:
        """Read access without taking the write lock (WAL readers never wait for writers).

        Outside a transaction the reads run in a deferred read transaction, so a method that
        issues several SELECTs sees one consistent snapshot even while other connections
        commit. Holds the connection's thread lock, so another thread's open transaction is
        never seen half-done; with `tx`, reads inside that transaction.

        Raises:
            EngineError: the database is closed, or `tx` belongs to another database.
        """
        if tx is not None and tx.db is not self:
            raise EngineError("tx= belongs to another database")
        with self._lock:
            self._check_open()
            if self.connection.in_transaction:
                yield self._session
                return
            self.connection.execute("BEGIN DEFERRED")
            try:
                yield self._session
            finally:
                if self.connection.in_transaction:
                    self.connection.execute("COMMIT")

    def on_commit(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after each commit made through `transaction()`; returns a function
        that removes it. Listeners run on the committing thread, outside the lock."""
        self._commit_listeners.append(listener)
        return lambda: self._commit_listeners.remove(listener) if listener in self._commit_listeners else None

    def _notify_commit(self) -> None:
        # The commit has happened: a failing listener is logged, never reported to the
        # writer as if its transaction had failed.
        for listener in list(self._commit_listeners):
            try:
                listener()
            except Exception:
                log.exception("commit listener %r of %s failed", listener, self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"database {self.path} is closed")

    # -- the stores (attached lazily: they stand on this module, not the reverse) -------

    @cached_property
    def topics(self):
        from .topics import TopicStore
        return TopicStore(self)

    @cached_property
    def events(self):
        from .events import EventStore
        return EventStore(self)

    @cached_property
    def handler_runs(self):
        from .handler_runs import HandlerRunStore
        return HandlerRunStore(self)

    @cached_property
    def mutations(self):
        from .mutations import MutationStore
        return MutationStore(self)

    @cached_property
    def handler_state(self):
        from .handler_state import HandlerStateStore
        return HandlerStateStore(self)

    @cached_property
    def ownership(self):
        from .ownership import OwnershipStore
        return OwnershipStore(self)

    @cached_property
    def conflicts(self):
        from .conflicts import ConflictStore
        return ConflictStore(self)

    @cached_property
    def execution(self):
        from .execution import ExecutionModel
        return ExecutionModel(self)

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Finalize cr-sqlite and close the connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                close_connection(self.connection)
            except apsw.Error:
                # e.g. a cursor the application left open on db.connection: close anyway
                # rather than leak the file handle, then report it.
                self.connection.close(True)
                raise

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Database {self.path} site={self.site_id if not self._closed else '?'}>"
