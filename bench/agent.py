"""A replica in a process of its own, driven by the benchmark process over stdin/stdout.

    python -m bench.agent                # then one JSON command per line on stdin

Two-process benchmarks (B5 live through a hub, B8 over WebSocket) need the other side of the
socket in another interpreter: one GIL per process, as in a real deployment. Each command is
one JSON object per line; each reply is one JSON line (`{"ok": ...}` or `{"error": ...}`).
`seen` notices (B5) are extra lines written whenever an expected row becomes visible.

Commands:
    open path [audit]    open (creating) a replica at `path` with the benchmarks' manual clock
                         (the conflict audit on unless `audit` is false, as in bench.data)
    serve                serve it over WebSocket on a free loopback port; reply the URL
    connect url          keep it in live sync with `url`; reply once connected and caught up
    pull url             one sync round with `url` (timed here, reply seconds and counts)
    expect id            report `{"seen": id, "ns": t}` once row `events.id` is committed here,
                         `t` = perf_counter_ns() just after the commit that made it visible
    write row            insert one `events` row in one transaction; reply its start time (ns)
    hops                 reply this process's hop timings (sync.hops), then reset them
    quit                 close everything and exit

perf_counter_ns() is CLOCK_MONOTONIC on Linux: one clock for every process of the machine, so
the benchmark process may subtract one agent's times from another's.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from engine import Database, ManualClock  # noqa: E402
from engine.database import close_connection, connect  # noqa: E402

from bench.data import INSERT_EVENT, NOW_MS, TOKEN  # noqa: E402

__all__ = ["Agent", "Remote", "main"]

_CONNECT_TIMEOUT = 30.0


class _Watcher:
    """Reports expected rows as they become visible, stamped with the commit that showed them.

    The check runs in the commit listener, on the committing thread right after COMMIT: the
    first commit after which a row is readable is the one that brought it (a later commit, e.g.
    a watermark update, must not be credited), and no thread of the benchmark's own competes
    with the sync threads in between. It costs one indexed SELECT per pending row and commit,
    on a connection of the watcher's own (no pool, no lock shared with the sync threads).
    """

    def __init__(self, db: Database, say):
        self.db = db
        self.say = say
        self.pending: set[str] = set()
        self.lock = threading.Lock()  # listeners of two committing threads may overlap
        self._connection = connect(db.path)
        self._remove = db.on_commit(self._on_commit)

    def _on_commit(self) -> None:
        stamp = time.perf_counter_ns()
        with self.lock:
            pending = list(self.pending)
        for event_id in pending:
            self._check(event_id, stamp)

    def _check(self, event_id: str, stamp: int) -> None:
        with self.lock:
            if event_id not in self.pending:
                return
            if not self._connection.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchall():
                return
            self.pending.discard(event_id)
        self.say({"seen": event_id, "ns": stamp})

    def expect(self, event_id: str) -> None:
        with self.lock:
            self.pending.add(event_id)
        self._check(event_id, time.perf_counter_ns())  # already here (cannot be, in B5: a guard)

    def close(self) -> None:
        self._remove()
        close_connection(self._connection)


class Agent:
    """The replica and the sync objects of this process (see the module docstring)."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.out_lock = threading.Lock()
        self.db: Database | None = None
        self.server = None
        self.clients: list = []
        self.watcher: _Watcher | None = None

    def say(self, message: dict) -> None:
        line = json.dumps(message)
        with self.out_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def handle(self, command: dict) -> Any:
        op = command["op"]
        if op == "open":
            self.db = Database.open(command["path"], clock=ManualClock(start_ms=NOW_MS),
                                    audit=command.get("audit", True))
            return self.db.site_id
        if op == "serve":
            import sync
            self.server = sync.serve(self.db, "127.0.0.1", 0, token=TOKEN)
            return self.server.url
        if op == "connect":
            import sync
            client = sync.connect(self.db, command["url"], token=TOKEN)
            self.clients.append(client)
            client.wait_connected(_CONNECT_TIMEOUT)
            return True
        if op == "pull":
            import sync
            started = time.perf_counter()
            result = sync.Peer(self.db).sync_with(command["url"], token=TOKEN)
            return {"seconds": time.perf_counter() - started, "pulled": result.pulled, "pushed": result.pushed}
        if op == "expect":
            if self.watcher is None:
                self.watcher = _Watcher(self.db, self.say)
            self.watcher.expect(command["id"])
            return True
        if op == "write":
            started = time.perf_counter_ns()
            with self.db.transaction() as tx:
                tx.execute(INSERT_EVENT, tuple(command["row"]))
            return started
        if op == "hops":
            from sync import hops
            return hops.take()
        raise ValueError(f"unknown command {op!r}")

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        for client in self.clients:
            client.close()
        if self.server is not None:
            self.server.close()
        if self.db is not None:
            self.db.close()


class Remote:
    """The benchmark side of one agent process: `call(op, **args)` sends a command and returns
    its reply; `seen(timeout)` returns the next `(id, ns)` notice. A context manager; `close()`
    asks the agent to quit and waits for it.

    Raises (from `call`):
        BenchError: the agent replied with an error, died, or did not answer in time.
    """

    def __init__(self, name: str, *, env: dict | None = None, timeout: float = 600.0):
        self.name = name
        self.timeout = timeout
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.agent"], cwd=Path(__file__).resolve().parent.parent, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._replies: queue.Queue = queue.Queue()
        self._seen: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-remote {name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            (self._seen if "seen" in message else self._replies).put(message)
        self._replies.put({"error": f"agent {self.name} exited (status {self.process.wait()})"})

    def send(self, op: str, **args: Any) -> None:
        """Send a command without waiting for its reply (collect it with `reply()`)."""
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()

    def reply(self) -> Any:
        from bench.harness import BenchError
        try:
            message = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise BenchError(f"agent {self.name}: no reply within {self.timeout:g} s") from None
        if "error" in message:
            raise BenchError(f"agent {self.name}: {message['error']}")
        return message["ok"]

    def call(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        return self.reply()

    def seen(self, timeout: float) -> tuple[str, int]:
        from bench.harness import BenchError
        try:
            message = self._seen.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"agent {self.name}: an expected row did not arrive within {timeout:g} s") from None
        return message["seen"], message["ns"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    agent = Agent()
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "quit":
                break
            try:
                agent.say({"ok": agent.handle(command)})
            except Exception as error:  # reported to the benchmark process, which raises it
                agent.say({"error": f"{type(error).__name__}: {error}"})
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
