"""Noticing new commits to a replica file: one notifier per `Database`, shared by every listener.

Two sources wake it:
- `poke()`, called from the writer connection's WAL hook (and after every `transaction()`
  commit, for ":memory:" databases, which have no WAL): commits made through this Database
  object, whatever path they took (store calls, `db.connection`, a sync merge);
- a poll of `PRAGMA data_version` on the notifier's own connection every `poll_interval`
  seconds: it changes when *another* connection or process commits to the same file.

Listeners run on the notifier's thread, one call per wake-up however many commits it covers.
They must be cheap and must not block (set a flag, queue a token): a slow listener delays
every other one. The thread starts with the first listener and ends when the database closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import apsw

if TYPE_CHECKING:
    from .database import Database

__all__ = ["ChangeNotifier", "DEFAULT_POLL_INTERVAL"]

log = logging.getLogger("engine.notifier")

DEFAULT_POLL_INTERVAL = 0.005
"""Seconds between `PRAGMA data_version` checks (commits by other connections or processes)."""


class ChangeNotifier:
    """Calls its listeners when the database may hold new committed changes (see module doc)."""

    def __init__(self, db: "Database", poll_interval: float = DEFAULT_POLL_INTERVAL):
        self.db = db
        self.poll_interval = poll_interval
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wakeups = 0  # listener rounds run (diagnostics, tests)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after new commits; returns the function that unsubscribes it."""
        with self._lock:
            self._listeners.append(listener)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"engine-notifier {self.db.path}",
                                                daemon=True)
                self._thread.start()

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def poke(self) -> None:
        """A commit happened on this database's connection: wake the listeners soon. Never blocks."""
        self._wake.set()

    def _run(self) -> None:
        """Thread entry: wait for a poke or the poll tick, then call the listeners."""
        watcher = self._open_watcher()
        last = self._data_version(watcher)
        try:
            while not self._stop.is_set():
                poked = self._wake.wait(self.poll_interval if watcher is not None else None)
                if self._stop.is_set():
                    return
                self._wake.clear()
                current = self._data_version(watcher)
                if poked or current != last:
                    self._notify()
                last = current
        finally:
            if watcher is not None:
                self.db._close_connection_quietly(watcher)

    def _open_watcher(self) -> apsw.Connection | None:
        """A connection of its own for the poll (None for ":memory:": nobody else can write it)."""
        if self.db.in_memory:
            return None
        try:
            return self.db._new_connection()
        except apsw.Error as error:
            log.warning("notifier of %s cannot open a connection (%s): only this object's commits "
                        "will be noticed", self.db.path, error)
            return None

    def _data_version(self, watcher: apsw.Connection | None) -> int | None:
        """The file's data_version seen from the watcher; None after a failed read, which then
        counts as a change (we cannot tell what happened meanwhile: wake to be safe)."""
        if watcher is None:
            return 0
        try:
            return cast(int, watcher.execute("PRAGMA data_version").fetchall()[0][0])
        except apsw.Error as error:
            log.warning("data_version poll of %s failed (%s); retrying", self.db.path, error)
            return None

    def _notify(self) -> None:
        self.wakeups += 1
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("change listener %r of %s failed", listener, self.db.path)

    def close(self) -> None:
        """Stop the thread (the database is closing). Idempotent."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
