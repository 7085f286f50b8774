"""One open asyncio WebSocket driven by one sync session: the asyncio twin of
`sync.websocket.channel.Channel`, over the same sans-I/O `Session`.

The loop only moves frames: a reader task puts received frames into a bounded inbox, and
the channel's task feeds them to the session and sends what comes out. Every session call
reads or merges the database, so it runs in a worker thread (`Lane`), never on the loop.
New commits wake the channel through `db.on_change`, whose callback runs on the notifier's
thread and hands over to the loop (`loop_listener`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from engine import Database

from ..session import Session
from ..websocket.channel import INBOX_FRAMES, Timeouts, TransportStats, closed_reason

__all__ = ["AsyncChannel", "Lane", "loop_listener"]

log = logging.getLogger("sync.aio")

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED = object()  # inbox token: the connection is gone
_WAKE = object()  # inbox token: look at the wake flag


class Lane:
    """Runs calls on one object that is not thread-safe (a `Session`, a cursor) in worker
    threads, one at a time. A call left behind by a cancelled task still finishes before the
    next one starts, so the object is never used by two threads at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, partial(self._locked, fn, *args, **kwargs))

    async def finish(self, fn: Callable[[], None]) -> None:
        """A last call (a close) that runs to the end even if the task is cancelled meanwhile."""
        await asyncio.shield(self.call(fn))

    def _locked(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._lock:
            return fn(*args, **kwargs)


def loop_listener(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Callable[[], None]:
    """A `db.on_change` listener (it runs on the notifier's thread) that calls `callback` on
    the event loop. Never blocks; does nothing once the loop is closed."""

    def listener() -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return listener


class AsyncChannel:
    """One open asyncio WebSocket driven by one session; `run()` is its whole life."""

    def __init__(self, ws: Connection, session: Session, lane: Lane, *, label: str,
                 stats: TransportStats | None = None):
        self.ws = ws
        self.session = session
        self.lane = lane  # every call of the session goes through it, its close() too
        self.label = label
        self.stats = stats
        self.close_exc: ConnectionClosed | None = None
        self._inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=INBOX_FRAMES)
        self._wake_pending = False
        self._counted = (0, 0, 0)

    def wake(self) -> None:
        """Local commits may exist (on the loop's thread): never blocks, never lost."""
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._inbox.put_nowait(_WAKE)
            except asyncio.QueueFull:
                pass  # the loop checks the flag after every frame it takes out

    async def run(
        self,
        *,
        db: Database | None = None,
        idle_timeout: float | None = None,
        handshake_timeout: float | None = None,
        on_progress: Callable[[Session], None] | None = None,
    ) -> None:
        """Drive the session until it finishes or the connection closes. With `db`, the
        session is woken (`local_changes()`) after every commit to it. `on_progress(session)`
        runs on the loop after every step. The caller closes the socket and the session
        (`lane.finish(session.close)`).

        Raises:
            TransportError: nothing arrived for `idle_timeout` seconds, or the handshake was
                not complete after `handshake_timeout` seconds.
        """
        timeouts = Timeouts(self.label, idle_timeout, handshake_timeout)
        reader = asyncio.create_task(self._read(), name=f"sync-aio-read {self.label}")
        unsubscribe = db.on_change(loop_listener(asyncio.get_running_loop(), self.wake)) if db is not None else None
        session, call = self.session, self.lane.call
        try:
            await self._send(await call(session.start))
            self.wake()
            while not session.finished:
                try:
                    async with asyncio.timeout(timeouts.next_wait(session)):
                        item = await self._inbox.get()
                except TimeoutError:
                    raise timeouts.expired() from None
                if item is _CLOSED:
                    break
                if isinstance(item, bytes):
                    await self._send(await call(session.receive, item))
                if self._wake_pending and not session.finished:
                    self._wake_pending = False
                    await self._send(await call(session.local_changes))
                self._count()
                if on_progress is not None:
                    on_progress(session)
        except ConnectionClosed as exc:
            self.close_exc = self.close_exc or exc
        finally:
            if unsubscribe is not None:
                unsubscribe()
            reader.cancel()
            await asyncio.wait({reader})
            self._count()

    async def _send(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self.ws.send(frame)

    async def _read(self) -> None:
        """Task: frames into the inbox until the connection closes (or the task is cancelled)."""
        try:
            while True:
                await self._inbox.put(await self.ws.recv(decode=False))
        except ConnectionClosed as exc:
            self.close_exc = exc
        except Exception:
            log.exception("%s: reading failed", self.label)
        finally:
            try:
                self._inbox.put_nowait(_CLOSED)
            except asyncio.QueueFull:
                self._inbox.get_nowait()  # a frame nobody will handle now: the end matters more
                self._inbox.put_nowait(_CLOSED)

    def _count(self) -> None:
        """Add the session's progress since the last call to the owner's counters."""
        if self.stats is not None:
            self._counted = self.stats.follow(self.session.result, self._counted)

    def closed_reason(self) -> str:
        """Why the connection ended, in words (for errors and logs)."""
        return closed_reason(self.close_exc)
