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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import apsw

from . import lineage as _lineage
from . import migrations as _migrations
from .clock import Clock, SystemClock
from .errors import EngineError, ExtensionNotFoundError, MergeListenerError
from .notifier import DEFAULT_POLL_INTERVAL, ChangeNotifier
from .resources import data_path

if TYPE_CHECKING:  # the stores stand on this module: imported here for annotations only
    from .conflicts import ConflictStore
    from .events import EventStore
    from .execution import ExecutionModel
    from .handler_runs import HandlerRunStore
    from .handler_state import HandlerStateStore
    from .mutations import MutationStore
    from .ownership import OwnershipStore
    from .topics import TopicStore

__all__ = [
    "Database",
    "Session",
    "MergeListener",
    "Row",
    "connect",
    "extension_path",
    "BUSY_TIMEOUT_MS",
    "READER_POOL_SIZE",
]

log = logging.getLogger("engine.database")

DEFAULT_EXTENSION = data_path("crsqlite.so", "extensions", "crsqlite.so")  # wheel's copy, else the checkout's
BUSY_TIMEOUT_MS = 10_000
READER_POOL_SIZE = 4
"""Reader connections a Database keeps open for `reading()` (more are opened while all are busy)."""
_ENTRY_POINT = "sqlite3_crsqlite_init"


def extension_path(explicit: str | os.PathLike[str] | None = None) -> str:
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


def connect(path: str, extension: str | os.PathLike[str] | None = None) -> apsw.Connection:
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
        _load_crsqlite(connection, library)
        connection.enable_load_extension(False)
        connection.execute("PRAGMA journal_mode = WAL").fetchall()
        connection.execute("PRAGMA synchronous = NORMAL").fetchall()
        connection.execute("SELECT crsql_config_set('merge-equal-values', 1)").fetchall()
    except BaseException:
        connection.close()
        raise
    return connection


def _load_crsqlite(connection: apsw.Connection, library: str) -> None:
    """Load cr-sqlite. Its init creates `crsql_master` and then records its version in a
    second statement: another connection loading it in between reads "version 0" and fails
    (seen with several processes opening a new file). So on a file whose init is not
    complete, load inside a write transaction: concurrent inits queue behind each other.
    On an initialized file loading only reads, and never waits for a writer."""
    initialized = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'crsql_master'").fetchall()
    if initialized:
        initialized = connection.execute(
            "SELECT 1 FROM crsql_master WHERE key = 'crsqlite_version'").fetchall()
    if initialized or connection.filename == "":
        connection.load_extension(library, _ENTRY_POINT)
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.load_extension(library, _ENTRY_POINT)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def close_connection(connection: apsw.Connection) -> None:
    """Finalize cr-sqlite's cached statements, then close (APSW refuses otherwise)."""
    connection.execute("SELECT crsql_finalize()").fetchall()
    connection.close()


Row: TypeAlias = tuple[Any, ...]
"""One result row. Its columns are typed by the SQL that selected them, which the type checker
cannot read: callers unpack rows into annotated names (or a Struct, see engine.rows)."""


class Session:
    """What a transaction (or a read) hands out: the connection plus queries that always
    exhaust their cursor (an open cursor would keep the connection from closing)."""

    def __init__(self, db: "Database", connection: apsw.Connection):
        self.db = db
        self.connection = connection

    def execute(self, sql: str, params: apsw.Bindings = ()) -> list[Row]:
        return self.connection.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[apsw.Bindings]) -> None:
        for _ in self.connection.executemany(sql, rows):
            pass

    def one(self, sql: str, params: apsw.Bindings = ()) -> Row | None:
        rows = self.connection.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params: apsw.Bindings = ()) -> Any:
        """The first column of the first row (None when there is none). Typed `Any` like the
        columns of a `Row`: what it holds is decided by the SQL."""
        rows = self.connection.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    def changes(self) -> int:
        """Rows changed by the last statement (correct for CRR tables too)."""
        return self.connection.changes()

    def now_ms(self) -> int:
        return self.db.clock.now_ms()


MergeListener = Callable[[Session, Sequence[tuple[str, tuple[Any, ...]]]], None]
"""`listener(tx, merged)`: called inside a merging transaction with the distinct
(table, primary-key values) of the rows the merge touched."""


class _ReaderPool:
    """Idle reader connections of one file. A reader is lent to one thread at a time."""

    def __init__(self, db: "Database", size: int):
        self.db = db
        self.size = size
        self._idle: list[apsw.Connection] = []
        self._lock = threading.Lock()

    def take(self) -> apsw.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.db._new_connection()

    def give_back(self, connection: apsw.Connection) -> None:
        with self._lock:
            if not self.db.closed and len(self._idle) < self.size and not connection.in_transaction:
                self._idle.append(connection)
                return
        self.db._close_connection_quietly(connection)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self.db._close_connection_quietly(connection)


class Database:
    """One replica. Use `Database.open(path)`; close it (or use `with`) when done.

    Thread-safe. Writes go through one writer connection behind a re-entrant lock: a
    transaction holds it from BEGIN to COMMIT, so other threads' writes wait rather than
    interleave. Reads (`reading()`) use a small pool of reader connections: in WAL mode a
    reader sees the last committed snapshot and never waits for the writer, so a long sync
    merge does not delay the application's reads. (":memory:" databases exist on one
    connection only: there, reads share the writer and its lock.)
    """

    def __init__(self, connection: apsw.Connection, *, path: str, clock: Clock, extension: str | None,
                 poll_interval: float = DEFAULT_POLL_INTERVAL):
        self.connection = connection
        self.path = path
        self.clock = clock
        self.extension = extension
        self.incarnation = ""
        self.in_memory = path == ":memory:" or path == "" or path.startswith("file::memory:")
        self._lock = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self._session = Session(self, connection)
        self._readers = None if self.in_memory else _ReaderPool(self, READER_POOL_SIZE)
        self._commit_listeners: list[Callable[[], None]] = []
        self._merge_listeners: list[MergeListener] = []
        self._notifier = ChangeNotifier(self, poll_interval)
        self._closed = False
        connection.set_wal_hook(self._on_wal_commit)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        extension: str | os.PathLike[str] | None = None,
        migrations: str | os.PathLike[str] | None = None,
        audit: bool = True,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> "Database":
        """Open (creating if needed) the replica at `path` (":memory:" works) and migrate it.

        `migrations` is a folder of NNNN_name.sql files; the project's own by default. When
        the database holds the execution stores' tables, the after-merge conflict audit
        (engine.replication) runs inside every merge unless `audit=False`. `poll_interval`
        is how often (seconds) the change notifier looks for commits by other processes.

        Raises:
            ExtensionNotFoundError: cr-sqlite is not built.
            SchemaError: a migration breaks a CRR rule, or the file is newer than the code.
        """
        path = str(path)
        connection = connect(path, extension)
        db = cls(connection, path=path, clock=clock or SystemClock(), extension=str(extension or "") or None,
                 poll_interval=poll_interval)
        try:
            found = _migrations.discover(migrations or _migrations.DEFAULT_MIGRATIONS_DIR)
            _migrations.migrate(connection, found, db.clock.now_ms(), path=path)
            db.incarnation = _lineage.ensure_incarnation(connection, None if db.in_memory else path,
                                                         db.clock.now_ms())
            if audit:
                from .replication import enable_audit  # the store layer, standing on this one

                enable_audit(db)
        except BaseException:
            db.close()
            raise
        return db

    # -- facts -------------------------------------------------------------------------

    @cached_property
    def site_id(self) -> str:
        """This replica's cr-sqlite site id, 32 lowercase hex characters."""
        with self.reading() as s:
            site_id: str = s.scalar("SELECT lower(hex(crsql_site_id()))")
        return site_id

    @property
    def db_version(self) -> int:
        """cr-sqlite's logical clock: the db_version of the latest committed change."""
        with self.reading() as s:
            version: int = s.scalar("SELECT crsql_db_version()")
        return version

    @property
    def schema_version(self) -> int:
        """The highest migration applied to the file (read each time: another process may
        have migrated it since this object opened it)."""
        with self.reading() as s:
            return _migrations.applied_version(s.connection)

    @property
    def crr_tables(self) -> list[str]:
        with self.reading() as s:
            return _migrations.crr_tables(s.connection)

    @property
    def schema_cookie(self) -> int:
        """SQLite's schema counter: changes whenever any connection alters the schema (e.g. another
        process ran a migration). Cheap; used to know when cached schema facts are stale."""
        with self.reading() as s:
            cookie: int = s.scalar("PRAGMA schema_version")
        return cookie

    @property
    def schema_fingerprint(self) -> str:
        """A short hash of the CRR tables and their columns: two replicas can merge changes
        only when these agree."""
        digest = hashlib.sha256()
        with self.reading() as s:
            for table in _migrations.crr_tables(s.connection):
                digest.update(f"T{table}\0".encode())
                for _cid, name, decl_type, _nn, _default, pk in s.execute(f'PRAGMA table_info("{table}")'):
                    digest.update(f"C{name}\0{decl_type}\0{pk}\0".encode())
        return digest.hexdigest()[:16]

    def descends_from(self, incarnation: str, version: int) -> bool:
        """True when this file continues `incarnation` of its site up to db_version `version`
        (a peer's record of us); False for a copy that split from it earlier (engine.lineage)."""
        with self.reading() as s:
            return _lineage.descends_from(s.connection, incarnation, version)

    def clone_to(self, path: str | os.PathLike[str]) -> str:
        """Copy this replica to a new file at `path` that is a replica of its own, with a new
        site id; returns it. The way to turn a copied file or a restored backup (refused by
        sync with `DuplicateSiteError`) into a replica that can sync: clone it and use the clone.

        The clone holds every row and every change of this one, still attributed to the sites
        that made them (this replica's own changes keep this replica's site id), and the same
        sync watermarks for its peers; it owns none of this replica's workflows (ownership is
        by site id).

        Raises:
            FileExistsError: something is at `path` already (never overwritten).
            EngineError: the database is closed.
        """
        target = Path(path)
        if target.exists():
            raise FileExistsError(17, "refusing to overwrite", str(target))
        with self.borrow_reader() as reader, (self._lock if reader.connection is self.connection else nullcontext()):
            reader.execute("VACUUM INTO ?", (str(target),))  # a consistent copy, outside any transaction
        return _lineage.give_new_site_id(str(target))

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
        if tx is not None and (tx.db is not self or tx.connection is not self.connection):
            raise EngineError("tx= belongs to another database (or is a read-only session)")
        with self._lock:
            self._check_open()
            depth = self._depth
            savepoint = f"sp{depth}"
            execute = self.connection.execute
            execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
            self._depth = depth + 1
            self._owner = threading.get_ident()
            try:
                yield self._session
            except BaseException:
                self._leave(depth)
                if depth == 0:
                    if self.connection.in_transaction:
                        execute("ROLLBACK")
                else:
                    execute(f"ROLLBACK TO {savepoint}")
                    execute(f"RELEASE {savepoint}")
                raise
            self._leave(depth)
            if depth:
                execute(f"RELEASE {savepoint}")
                return
            try:
                execute("COMMIT")
            except BaseException:
                if self.connection.in_transaction:
                    execute("ROLLBACK")
                raise
        if self.in_memory:
            self._notifier.poke()  # no WAL, no WAL hook
        self._notify_commit()

    def _leave(self, depth: int) -> None:
        self._depth = depth
        if depth == 0:
            self._owner = None

    @contextmanager
    def reading(self, tx: Session | None = None) -> Iterator[Session]:
        """Read access that never waits for a writer.

        Outside a transaction the reads run on a pooled reader connection in one deferred
        read transaction: a method that issues several SELECTs sees one consistent snapshot
        of committed data, while the writer (another thread's transaction, a sync merge)
        goes on. Inside this thread's open transaction, or with `tx`, reads go through that
        session and see its uncommitted writes.

        Raises:
            EngineError: the database is closed, or `tx` belongs to another database.
        """
        if tx is not None:
            if tx.db is not self:
                raise EngineError("tx= belongs to another database")
            if tx.connection is not self.connection:
                yield tx  # a reader lent to the caller (`borrow_reader`)
                return
        if tx is not None or self._readers is None or self._owner == threading.get_ident():
            with self._lock:
                self._check_open()
                if self.connection.in_transaction:
                    yield self._session
                    return
                with self._read_transaction(self.connection):
                    yield self._session
            return
        self._check_open()
        connection = self._readers.take()
        try:
            with self._read_transaction(connection):
                yield Session(self, connection)
        finally:
            self._readers.give_back(connection)

    @staticmethod
    @contextmanager
    def _read_transaction(connection: apsw.Connection) -> Iterator[None]:
        connection.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")

    @contextmanager
    def borrow_reader(self) -> Iterator[Session]:
        """A reader connection of this thread's own until the block ends, in autocommit mode
        (e.g. to keep TEMP tables between reads; pass it as `reading(tx=...)`). On ":memory:"
        it is the writer's session, used under the writer's lock by `reading()`.

        Raises:
            EngineError: the database is closed.
        """
        self._check_open()
        if self._readers is None:
            yield self._session
            return
        connection = self._readers.take()
        try:
            yield Session(self, connection)
        finally:
            self._readers.give_back(connection)

    # -- listeners -----------------------------------------------------------------------

    def on_commit(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after each commit made through `transaction()`; returns a function
        that removes it. Listeners run on the committing thread, outside the lock."""
        self._commit_listeners.append(listener)
        return lambda: self._commit_listeners.remove(listener) if listener in self._commit_listeners else None

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` soon after any commit to this file: through this object (any path,
        `db.connection` included, noticed by the WAL hook) or by another connection or process
        (noticed by polling `PRAGMA data_version`). One notifier thread per database serves
        every listener; listeners must be cheap and never block. Returns the remover."""
        return self._notifier.subscribe(listener)

    def on_merge(self, listener: MergeListener) -> Callable[[], None]:
        """Call `listener(tx, merged)` inside every transaction that merges changes received
        from another replica (sync calls `notify_merge`). `merged` lists the distinct
        (table, primary-key values) of the touched rows; a large merge may report in several
        calls within one transaction. Whatever the listener writes commits atomically with the
        merge; an exception rolls the merge back. Returns the remover."""
        self._merge_listeners.append(listener)
        return lambda: self._merge_listeners.remove(listener) if listener in self._merge_listeners else None

    @property
    def merge_listeners(self) -> list[MergeListener]:
        return list(self._merge_listeners)

    def notify_merge(self, tx: Session, merged: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Called by sync inside a merging transaction (see `on_merge`).

        Raises:
            MergeListenerError: a listener raised (the caller's transaction then rolls back).
        """
        for listener in list(self._merge_listeners):
            try:
                listener(tx, merged)
            except Exception as error:
                name = getattr(listener, "__qualname__", repr(listener))
                raise MergeListenerError(f"merge listener {name} failed: {error}") from error

    def _notify_commit(self) -> None:
        # The commit has happened: a failing listener is logged, never reported to the
        # writer as if its transaction had failed.
        for listener in list(self._commit_listeners):
            try:
                listener()
            except Exception:
                log.exception("commit listener %r of %s failed", listener, self.path)

    def _on_wal_commit(self, connection: apsw.Connection, name: str, pages: int) -> int:
        """The writer's WAL hook: a commit is durable and visible. Registering it turns off
        SQLite's automatic checkpoint, so do what that does: a passive checkpoint past 1000 pages."""
        self._notifier.poke()
        if pages >= 1000:
            try:
                connection.wal_checkpoint(name, apsw.SQLITE_CHECKPOINT_PASSIVE)
            except apsw.Error as error:  # busy readers: the next commit tries again
                log.debug("checkpoint of %s deferred: %s", self.path, error)
        return apsw.SQLITE_OK

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"database {self.path} is closed")

    def _new_connection(self) -> apsw.Connection:
        return connect(self.path, self.extension)

    def _close_connection_quietly(self, connection: apsw.Connection) -> None:
        try:
            close_connection(connection)
        except apsw.Error as error:
            log.debug("closing a connection of %s: %s", self.path, error)
            connection.close(True)

    # -- the stores (attached lazily: they stand on this module, not the reverse) -------

    @cached_property
    def topics(self) -> TopicStore:
        from .topics import TopicStore
        return TopicStore(self)

    @cached_property
    def events(self) -> EventStore:
        from .events import EventStore
        return EventStore(self)

    @cached_property
    def handler_runs(self) -> HandlerRunStore:
        from .handler_runs import HandlerRunStore
        return HandlerRunStore(self)

    @cached_property
    def mutations(self) -> MutationStore:
        from .mutations import MutationStore
        return MutationStore(self)

    @cached_property
    def handler_state(self) -> HandlerStateStore:
        from .handler_state import HandlerStateStore
        return HandlerStateStore(self)

    @cached_property
    def ownership(self) -> OwnershipStore:
        from .ownership import OwnershipStore
        return OwnershipStore(self)

    @cached_property
    def conflicts(self) -> ConflictStore:
        from .conflicts import ConflictStore
        return ConflictStore(self)

    @cached_property
    def execution(self) -> ExecutionModel:
        from .execution import ExecutionModel
        return ExecutionModel(self)

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the notifier, finalize cr-sqlite and close every connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._notifier.close()
        if self._readers is not None:
            self._readers.close()
        with self._lock:
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
