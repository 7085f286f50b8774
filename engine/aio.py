"""asyncio access to a replica: the `Database` API as awaitables that run in worker threads.

    async with AsyncDatabase.open("app.db") as adb:              # or: adb = await AsyncDatabase.open(...)
        await adb.events.publish("wf-1", "inbox", "msg-1", {"text": "hi"})
        async with adb.transaction() as tx:                       # one transaction, one thread
            await adb.topics.ensure("wf-1", "outbox")             # joins it (tx= is optional)
            await tx.execute("UPDATE topics SET name = ? WHERE id = ?", ("out", topic))
        print(await adb.db_version, await adb.events.peek("wf-1", "inbox"))

Why threads: every APSW call blocks, but APSW releases the GIL while SQLite works, so a
worker thread runs it while the event loop goes on. Nothing here runs SQL on the loop.

One generic mechanism, no wrapper per method: `adb.<name>...` is an `AsyncProxy`, a path of
attribute names resolved in the worker thread, never on the loop. Calling it runs the call
there (`await adb.events.publish(...)`); awaiting it reads the attribute there
(`await adb.db_version`). Python's types cannot turn a class's methods into coroutines, so
a proxy call is typed `Any`; `await adb.run(adb.db.events.publish, ...)` is the fully typed
spelling of the same thing (a `ParamSpec` over any callable).

Threads of one AsyncDatabase, and why:

    pool    `workers` threads for calls outside a transaction: each store call is its own
            transaction (or a read on a reader connection) exactly as on a thread of
            synchronous code; a write waiting for the writer lock waits in the worker.
    writer  one thread that runs `async with adb.transaction()`: BEGIN, every call awaited
            inside the block, COMMIT or ROLLBACK. The Database's writer lock is re-entrant
            per *thread* and the transaction belongs to the thread that began it, so
            everything of one transaction must run on one thread; a call made on that thread
            joins the transaction (a nested block is a SAVEPOINT), as in synchronous code
            inside `with db.transaction()`. Its queue is first in, first out: a rollback is
            always done before the next transaction begins, even after a cancellation.

"Inside the block" means awaited by the task that entered it (or by tasks it started
meanwhile): a context variable tells. Transactions of different tasks take turns (an
asyncio lock), so a task never blocks the loop waiting for another task's transaction.
Inside a block, do not wait for another task's writes outside it: they wait for the
transaction to end (a deadlock, as with two threads in synchronous code).

Listeners registered through the proxy (`await adb.on_change(fn)`) run where the Database
runs them (the notifier's thread); `sync.aio.watch` is the change feed for asyncio code.

Cancellation: a call not yet started is dropped; one already running in its worker
finishes (a store call is one transaction: it is then whole). A block left by an exception
or a cancellation rolls back.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from .clock import Clock
from .database import READER_POOL_SIZE, Database, Session
from .errors import EngineError
from .notifier import DEFAULT_POLL_INTERVAL

__all__ = ["AsyncDatabase", "AsyncProxy", "Opening", "in_transaction"]

P = ParamSpec("P")
T = TypeVar("T")


class _Closeable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=_Closeable)


class Opening(Generic[C]):
    """What `AsyncDatabase.open` (and `sync.aio.serve`) return: await it for the opened object,
    or use it with `async with` to have it closed at the end of the block.

        adb = await AsyncDatabase.open("app.db")        # close it yourself: await adb.close()
        async with AsyncDatabase.open("app.db") as adb:  # closed when the block ends
    """

    def __init__(self, opener: Callable[[], Awaitable[C]]):
        self._opener = opener
        self._opened: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._opener().__await__()

    async def __aenter__(self) -> C:
        self._opened = await self._opener()
        return self._opened

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._opened is not None:
            await self._opened.close()


class _Transaction:
    """The open transaction of a task (the value of the context variable)."""

    def __init__(self, adb: "AsyncDatabase"):
        self.adb = adb
        self.open = True


_current: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar("engine_aio_transaction",
                                                                               default=None)


def in_transaction(db: Database) -> bool:
    """True when the running task is inside an `AsyncDatabase.transaction()` block of `db`
    (work that must not join or wait for that transaction, such as a sync round, checks it)."""
    tx = _current.get()
    return tx is not None and tx.open and tx.adb.db is db


class AsyncProxy:
    """A path of attribute names below an object, resolved in the database's worker thread.

    `proxy.name` extends the path (nothing runs); `await proxy(...)` calls what the path
    names, in the worker; `await proxy` reads it there. Arguments that are proxies of a
    whole object (the `tx` of `async with adb.transaction() as tx`) are passed as that object,
    so `tx=tx` works. Names starting with "_" are not proxied (AttributeError at once).
    """

    __slots__ = ("_adb", "_target", "_path")

    def __init__(self, adb: "AsyncDatabase", target: object, path: tuple[str, ...] = ()):
        self._adb = adb
        self._target = target
        self._path = path

    def __getattr__(self, name: str) -> "AsyncProxy":
        if name.startswith("_"):
            raise AttributeError(name)
        return AsyncProxy(self._adb, self._target, self._path + (name,))

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_unwrap(a) for a in args)
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        return await self._adb.run(_call_path, self._target, self._path, args, kwargs)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._adb.run(_resolve, self._target, self._path).__await__()

    def __repr__(self) -> str:
        return f"<AsyncProxy {type(self._target).__name__}.{'.'.join(self._path)}>"


def _unwrap(value: Any) -> Any:
    if isinstance(value, AsyncProxy) and not value._path:
        return value._target
    return value


def _resolve(target: object, path: tuple[str, ...]) -> Any:
    for name in path:
        target = getattr(target, name)
    return target


def _call_path(target: object, path: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _resolve(target, path)(*args, **kwargs)


class AsyncDatabase:
    """A `Database` used from asyncio; see the module docstring. Owns the database: `close()`
    closes it. Use from one event loop.

    Any public attribute of the Database is reachable as an `AsyncProxy`:
    `await adb.events.publish(...)`, `await adb.execution.start_run(...)`,
    `await adb.site_id`, `await adb.clone_to(path)`. The synchronous object is `adb.db`.
    """

    def __init__(self, db: Database, *, workers: int = READER_POOL_SIZE):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.db = db
        name = os.path.basename(db.path) or db.path
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"engine-aio {name}")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"engine-aio-writer {name}")
        self._turns: asyncio.Lock | None = None  # created on first use, on the loop
        self._closed = False

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
        workers: int = READER_POOL_SIZE,
    ) -> Opening["AsyncDatabase"]:
        """`Database.open` in a worker thread (same arguments); `workers` sizes the pool of
        threads for calls outside transactions. Await the result, or `async with` it.

        Raises:
            ExtensionNotFoundError, SchemaError: as `Database.open`.
        """
        opener = partial(Database.open, path, clock=clock, extension=extension, migrations=migrations,
                         audit=audit, poll_interval=poll_interval)

        async def opening() -> AsyncDatabase:
            db = await _finish_even_if_cancelled(opener, on_abandon=Database.close)
            return cls(db, workers=workers)

        return Opening(opening)

    def __getattr__(self, name: str) -> AsyncProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return AsyncProxy(self, self.db, (name,))

    # -- running calls -------------------------------------------------------------------

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` in a worker thread: the writer thread inside this task's
        transaction block (so it joins the transaction), otherwise the pool.

        Raises:
            EngineError: this AsyncDatabase is closed.
            Exception: whatever `fn` raises.
        """
        executor = self._writer if self._in_own_transaction() else self._pool
        return await self._submit(executor, partial(fn, *args, **kwargs))

    async def _submit(self, executor: Executor, call: Callable[[], T]) -> T:
        if self._closed:
            raise EngineError(f"database {self.db.path} is closed")
        return await asyncio.wrap_future(executor.submit(call))

    # -- transactions --------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncProxy]:
        """A write transaction on the writer thread: BEGIN IMMEDIATE, COMMIT at the end of the
        block, ROLLBACK when it raises (or is cancelled). Calls awaited in the block join it;
        `tx` is the transaction's `Session` as a proxy (`await tx.execute(sql, params)`), and
        may be passed as `tx=` to store calls. Nested in the same task it is a SAVEPOINT
        (tasks started inside the block share the transaction as threads never do in
        synchronous code: open nested blocks from one task at a time).

        Raises:
            EngineError: the database is closed.
        """
        if self._in_own_transaction():
            async with self._block() as session:  # a SAVEPOINT of the task's transaction
                yield AsyncProxy(self, session)
            return
        async with self._transaction_turns():
            async with self._block() as session:
                state = _Transaction(self)
                token = _current.set(state)
                try:
                    yield AsyncProxy(self, session)
                finally:
                    state.open = False
                    _current.reset(token)

    @asynccontextmanager
    async def _block(self) -> AsyncIterator[Session]:
        """Enter `db.transaction()` on the writer thread and leave it there."""
        manager = self.db.transaction()
        session = await self._enter_on_writer(manager)
        try:
            yield session
        except BaseException as error:
            await self._exit_on_writer(manager, error)
            raise
        await self._exit_on_writer(manager, None)

    async def _enter_on_writer(self, manager: AbstractContextManager[Session]) -> Session:
        """BEGIN (or SAVEPOINT) on the writer thread. If the task is cancelled while it runs,
        a job queued right behind it (first in, first out) rolls it back."""
        if self._closed:
            raise EngineError(f"database {self.db.path} is closed")
        entering = self._writer.submit(manager.__enter__)
        try:
            return await asyncio.wrap_future(entering)
        except asyncio.CancelledError:
            self._writer.submit(_leave_if_entered, entering, manager)
            raise

    async def _exit_on_writer(self, manager: AbstractContextManager[Session], error: BaseException | None) -> None:
        """COMMIT (error None) or ROLLBACK on the writer thread; runs to the end even when the
        task is cancelled meanwhile (the writer lock must never stay taken)."""
        leaving = self._writer.submit(manager.__exit__, type(error) if error else None, error,
                                      error.__traceback__ if error else None)
        await asyncio.shield(asyncio.wrap_future(leaving))

    def _in_own_transaction(self) -> bool:
        """Is the running task inside one of this database's transaction blocks?"""
        return in_transaction(self.db)

    def _transaction_turns(self) -> asyncio.Lock:
        if self._turns is None:
            self._turns = asyncio.Lock()
        return self._turns

    # -- lifetime ------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for open transactions to end, finish the calls already started, close the
        database and stop the threads. Idempotent.

        Raises:
            EngineError: called inside one of this database's transaction blocks.
        """
        if self._closed:
            return
        if self._in_own_transaction():
            raise EngineError("AsyncDatabase.close() inside its own transaction block")
        async with self._transaction_turns():
            if self._closed:
                return
            self._closed = True
        await asyncio.shield(asyncio.to_thread(self._shut_down))

    def _shut_down(self) -> None:
        self._writer.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self.db.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> "AsyncDatabase":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncDatabase {self.db.path}{' closed' if self._closed else ''}>"


def _leave_if_entered(entering: Future[Session], manager: AbstractContextManager[Session]) -> None:
    """On the writer thread, after an abandoned BEGIN: roll it back if it happened."""
    if entering.cancelled() or entering.exception() is not None:
        return
    error = asyncio.CancelledError()
    manager.__exit__(asyncio.CancelledError, error, None)


async def _finish_even_if_cancelled(opener: Callable[[], T], *, on_abandon: Callable[[T], None]) -> T:
    """`opener()` in a worker thread. If the task is cancelled while it runs, what it opens is
    handed to `on_abandon` (in a worker) instead of leaking."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, opener)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def abandon(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                loop.run_in_executor(None, on_abandon, done.result())

        future.add_done_callback(abandon)
        raise
