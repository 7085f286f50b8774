"""`NatsReplica`: one database kept in sync through a NATS JetStream stream, in the background.

Threads (the replica is a context manager with an idempotent `close()`):

    sync-nats <name>     the asyncio event loop: the NATS connection, publisher, consumer,
                         checkpoint writer; reconnects (back off, re-pin) until closed
    sync-nats-db         every database call of the loop (reads, merges, bookkeeping), one at a
                         time, so no APSW call ever blocks the event loop
    engine-notifier      the database's change notifier (`db.on_change`, engine.notifier):
                         wakes the publisher on local commits, other processes' included

A failure a retry may fix (server gone or restarting, a failed merge, an unreachable bootstrap
peer) logs and reconnects with backoff; `error` says what happened last. A failure a retry
cannot fix (another schema, a stream gap no bootstrap closes, a change too large for the
server: `SyncError.permanent` or `MessageTooLargeError`) stops the replica: `failed` is true,
`error` holds the typed `SyncError`, and `wait_connected` raises it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import apsw
import nats

from engine.database import Database

from ..changes import CrrSchema, Limits
from ..errors import MessageTooLargeError, SyncError, TransportError
from ..inbox import ApplyOutcome
from ..protocol import Changes
from ..watermarks import ensure_tables
from ..websocket import TransportStats
from . import positions
from .bootstrap import BootstrapSource, Checkpoints, read_checkpoint
from .consuming import Consumer
from .layout import (
    TRANSIENT_ERRORS,
    NatsOptions,
    RunDb,
    check_name,
    ensure_bucket,
    ensure_stream,
    limits_for,
    stream_name,
)
from .publishing import Publisher
from .receiving import StreamInbox

if TYPE_CHECKING:
    from ssl import SSLContext

__all__ = ["NatsReplica", "NatsOptions", "replicate"]

log = logging.getLogger("sync.nats")
_BACKOFF_CAP = 5.0


class NatsReplica:
    """Keeps `db` in sync with every other replica on the stream of `name`; see `replicate`."""

    def __init__(
        self,
        db: Database,
        servers: str | Iterable[str],
        *,
        name: str,
        bootstrap: str | None = None,
        token: str | None = None,
        server_key: str | bytes | None = None,
        ssl: "SSLContext | None" = None,
        require_keys: bool = False,
        limits: Limits | None = None,
        options: NatsOptions | None = None,
    ):
        self.name = check_name(name)
        if bootstrap is None and (server_key is not None or ssl is not None or require_keys):
            raise ValueError("server_key, ssl and require_keys apply to the bootstrap peer; none is given")
        self.db = db
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream_name(name)
        self.options = options or NatsOptions()
        self.stats = TransportStats()  # sent = changes published, received/applied = merged here
        self.counts: Counter[str] = Counter()  # pages_published, pages_applied, parts_taken, repins, bootstraps, ...
        self.refusals: deque[SyncError] = deque(maxlen=100)  # messages refused (see sync.nats.consuming)
        self.error: SyncError | None = None
        self._limits = limits
        self._source = BootstrapSource(
            bootstrap, token, self.options.bootstrap_attempts, server_key=server_key, ssl=ssl,
            require_keys=require_keys) if bootstrap else None
        ensure_tables(db)
        positions.ensure_table(db)
        self._schema = CrrSchema.load(db)
        self._live = threading.Event()
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()  # set from close(), through the loop; bound to it on first use
        self._publisher: Publisher | None = None
        self._consumer: Consumer | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"sync-nats {name}", daemon=True)

    # -- the caller's side ---------------------------------------------------------------

    def start(self) -> "NatsReplica":
        """Connect and run in the background (`replicate` does this). Returns self."""
        self._unsubscribe = self.db.on_change(self._local_commit)
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        """True while connected with the consumer delivering."""
        return self._live.is_set()

    @property
    def failed(self) -> bool:
        """True once a permanent failure stopped the replica (see `error`)."""
        return self._failed.is_set()

    def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected and reading the stream.

        Raises:
            SyncError: the replica stopped for good (`SchemaMismatchError`, `StreamGapError`, ...).
            TimeoutError: not connected within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._live.is_set():
            if self._failed.is_set():
                assert self.error is not None  # set before the replica is marked failed
                raise self.error
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"not connected to {', '.join(self.servers)} within {timeout}s ({self.error})")
            self._live.wait(0.05 if remaining is None else min(0.05, remaining))  # sleep-ok: bounded wait

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the replica stops by itself (a permanent failure); True if it did."""
        return self._failed.wait(timeout)

    def close(self) -> None:
        """Stop publishing and reading, store positions, disconnect; waits for the threads.
        Idempotent. The database stays open (it is the caller's)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop already ended (a permanent failure)
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.options.api_timeout + 15)  # bounded: see _cancel, _wind_down
        if self._unsubscribe is not None:
            self._unsubscribe()

    def __enter__(self) -> "NatsReplica":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "failed" if self.failed else "live" if self.connected else "connecting"
        return f"<NatsReplica {self.stream} site={self.db.site_id} {state}>"

    # -- the loop's side -----------------------------------------------------------------

    def _local_commit(self) -> None:
        """`db.on_change` listener (the notifier's thread): wake the publisher."""
        loop, publisher = self._loop, self._publisher
        if loop is not None and publisher is not None:
            try:
                loop.call_soon_threadsafe(publisher.wake.set)
            except RuntimeError:
                pass

    def _run(self) -> None:
        """Thread entry: the event loop, until closed or failed for good."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-nats-db")
        try:
            self._loop = loop
            if self._closed:
                return
            loop.run_until_complete(self._supervise(executor))
        except Exception:
            log.exception("NATS replica %s stopped unexpectedly", self.stream)
        finally:
            self._live.clear()
            try:
                _cancel_leftovers(loop)  # tasks the client library left behind (as asyncio.run does)
            finally:
                executor.shutdown(wait=True)
                loop.close()

    async def _supervise(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()

        def run_db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

        delay = self.options.reconnect_wait
        while not self._stopping.is_set():
            pinned_before = self.counts["repins"]
            try:
                await self._run_connected(run_db)
                if self._stopping.is_set():
                    return
            except SyncError as error:
                self.error = error
                if error.permanent or isinstance(error, MessageTooLargeError):  # a retry cannot fix it
                    self._failed.set()
                    log.error("NATS replica %s stopped: %s", self.stream, error)
                    return
                log.warning("NATS replica %s: %s; reconnecting in %.2fs", self.stream, error, delay)
            except (apsw.BusyError, *TRANSIENT_ERRORS) as error:
                self.error = TransportError(f"NATS {', '.join(self.servers)}: {str(error) or type(error).__name__}")
                log.warning("NATS replica %s: %s; reconnecting in %.2fs", self.stream, self.error, delay)
            except Exception as error:  # a bug: keep the replica alive, loudly
                self.error = SyncError(f"internal error: {error!r}")
                log.exception("NATS replica %s failed; reconnecting in %.2fs", self.stream, delay)
            if self.counts["repins"] > pinned_before:  # it worked for a while: start backing off anew
                delay = self.options.reconnect_wait
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except asyncio.TimeoutError:
                delay = min(delay * 2, _BACKOFF_CAP)

    async def _run_connected(self, run_db: RunDb) -> None:
        """One connection's life, until closed or failed.

        Raises:
            SyncError: a permanent failure (or TransportError), from the publisher or consumer.
            nats errors: the connection could not be made or set up.
        """
        nc = await self._connect()
        if nc is None:
            return
        self.counts["connections"] += 1
        tasks: list[asyncio.Task[Any]] = []
        inbox = publisher = checkpoints = None
        try:
            js = nc.jetstream(timeout=self.options.api_timeout)
            await ensure_stream(js, self.name)
            checkpoints = Checkpoints(await ensure_bucket(js, self.name))
            limits = limits_for(nc.max_payload, self._limits)
            _, resume = await run_db(positions.read_positions, self.db, self.stream)
            inbox = await run_db(StreamInbox, self.db, self.stream, self._schema, limits, resume)
            publisher = self._publisher = Publisher(
                self.db, js, self.name, limits, run_db, self.options, on_published=self._published)
            inbox.on_merged = publisher.pass_over
            consumer = self._consumer = Consumer(
                self.db, nc, js, self.name, inbox, run_db, self.options, checkpoints=checkpoints,
                source=self._source, on_applied=self._applied, refusals=self.refusals, counts=self.counts)
            tasks = [asyncio.create_task(publisher.run(), name="publisher"),
                     asyncio.create_task(consumer.run(), name="consumer"),
                     asyncio.create_task(self._write_checkpoints(inbox, checkpoints, run_db), name="checkpoints")]
            announcer = asyncio.create_task(self._announce(consumer))
            stop = asyncio.create_task(self._stopping.wait())
            try:
                done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            finally:
                announcer.cancel()
                stop.cancel()
            for task in done:
                if task is not stop:
                    task.result()  # raises what stopped it
        finally:
            self._live.clear()
            self._publisher = self._consumer = None
            await _cancel(tasks)
            await self._wind_down(nc, run_db, inbox, publisher, checkpoints)

    async def _connect(self) -> Any:
        """A connection, or None when closed first.

        Raises:
            nats errors, OSError: no server reachable.
        """
        async def reconnected() -> None:
            if self._consumer is not None:
                self._consumer.repin()
            if self._publisher is not None:
                self._publisher.wake.set()
            log.info("NATS replica %s: reconnected", self.stream)

        async def disconnected() -> None:
            self._live.clear()

        async def error(exc: Exception) -> None:  # connection attempts failing, among others
            reason = str(exc) or type(exc).__name__
            log.debug("NATS replica %s: %s", self.stream, reason)
            if not self._live.is_set():
                self.error = TransportError(f"NATS {', '.join(self.servers)}: {reason}")

        connecting = asyncio.create_task(nats.connect(
            self.servers, name=f"crdt-sync {self.name} {self.db.site_id}",
            connect_timeout=self.options.connect_timeout, reconnect_time_wait=self.options.reconnect_wait,
            max_reconnect_attempts=-1, allow_reconnect=True,
            reconnected_cb=reconnected, disconnected_cb=disconnected, error_cb=error))
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([connecting, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not connecting.done():  # closed while connecting
            await _cancel([connecting])
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                await connecting.result().close()  # it connected regardless
            return None
        return connecting.result()

    async def _announce(self, consumer: Consumer) -> None:
        """`connected` follows the consumer: set whenever it is (re)pinned."""
        while True:
            await consumer.pinned.wait()
            consumer.pinned.clear()
            self.error = None
            self._live.set()

    async def _write_checkpoints(self, inbox: StreamInbox, checkpoints: Checkpoints, run_db: RunDb) -> None:
        """Write our checkpoint at start and after merges (at most once per interval); store
        the resume point that skipped messages moved."""
        inbox.progressed = True
        while True:
            if inbox.progressed:
                inbox.progressed = False
                checkpoint = await run_db(read_checkpoint, self.db)
                try:
                    await checkpoints.put(checkpoint)
                except TRANSIENT_ERRORS as error:
                    inbox.progressed = True
                    log.debug("writing the checkpoint of %s: %s", self.db.site_id, error)
            await run_db(inbox.flush)
            await asyncio.sleep(self.options.checkpoint_interval)

    async def _wind_down(self, nc: Any, run_db: RunDb, inbox: StreamInbox | None, publisher: Publisher | None,
                         checkpoints: Checkpoints | None) -> None:
        """Store positions, write a last checkpoint (best effort), close the connection."""
        try:
            if publisher is not None:
                await publisher.close()
            if inbox is not None:
                await run_db(inbox.close)
                if checkpoints is not None and nc.is_connected:
                    checkpoint = await run_db(read_checkpoint, self.db)
                    await asyncio.wait_for(checkpoints.put(checkpoint), self.options.api_timeout)
        except (SyncError, apsw.Error, asyncio.TimeoutError, *TRANSIENT_ERRORS) as error:
            log.warning("NATS replica %s: winding down: %s", self.stream, error)
        finally:
            try:
                await asyncio.wait_for(nc.close(), self.options.api_timeout)
            except (asyncio.TimeoutError, *TRANSIENT_ERRORS) as error:
                log.debug("closing the NATS connection: %s", error)

    def _published(self, page: Changes) -> None:
        self.counts["pages_published"] += 1
        self.stats.add(sent=len(page.rows))

    def _applied(self, page: Changes, outcome: ApplyOutcome) -> None:
        if outcome.fresh:
            self.counts["pages_applied"] += 1  # parts of a group included
            self.counts["parts_taken"] += page.more_parts  # taken before their group's last part
            self.stats.add(received=len(page.rows), applied=outcome.impacted)


async def _cancel(tasks: list[asyncio.Task[Any]], patience: float = 10.0) -> None:
    """Cancel `tasks` and wait for them to end, cancelling again while they run: Python 3.11's
    wait_for and timeout can swallow a cancellation that races a result (the client library
    uses them), so one cancel() is not always enough. Gives up after `patience` seconds."""
    pending = {task for task in tasks if not task.done()}
    deadline = asyncio.get_running_loop().time() + patience
    while pending:
        if asyncio.get_running_loop().time() > deadline:
            log.warning("tasks did not stop: %s", ", ".join(task.get_name() for task in pending))
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:  # retrieve what they raised while stopping, so it is not reported as lost
        if not task.cancelled():
            task.exception()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def replicate(
    db: Database,
    servers: str | Iterable[str],
    *,
    name: str,
    bootstrap: str | None = None,
    token: str | None = None,
    server_key: str | bytes | None = None,
    ssl: "SSLContext | None" = None,
    require_keys: bool = False,
    limits: Limits | None = None,
    options: NatsOptions | None = None,
) -> NatsReplica:
    """Keep `db` in sync through the NATS JetStream stream of `name` until closed; returns the
    started replica (a context manager).

    `servers` is a `nats://host:port` URL or several. Every replica of one fleet uses the same
    `name` (it names the stream `CRDT_<name>` and the subjects `crdt.<name>.<site id>`). The
    replica publishes its own commits as they happen (noticed through `db.on_change`: this
    object's commits at once, other processes' within `Database.open(poll_interval=...)`) and
    merges everyone else's; a replica new to the stream first reads all of it. `bootstrap` is
    a `ws://` or `wss://` peer to pull from when pages it lacks already left the stream, met
    as `Peer(db, require_keys=require_keys).sync_with(bootstrap, token=token,
    server_key=server_key, ssl=ssl)` meets it (keys and TLS: sync.handshake, sync.tls).
    `limits` bound the pages it publishes (capped to the server's max_payload).

    Raises:
        ValueError: `name` cannot name a stream; `bootstrap` is not a ws:// or wss:// URL;
            `server_key`, `ssl` or `require_keys` without `bootstrap`; `ssl` for a ws:// URL.
    """
    return NatsReplica(db, servers, name=name, bootstrap=bootstrap, token=token, server_key=server_key, ssl=ssl,
                       require_keys=require_keys, limits=limits, options=options).start()
