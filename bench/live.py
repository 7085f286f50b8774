"""B5: live propagation between three replicas over WebSocket on loopback.

Topology: replica A serves (`sync.serve`), B and C are live clients of A (`sync.connect`).
Writes rotate over A, B and C, so a third of them travel one hop (A → B and A → C) and two
thirds also need a relay (B → A → C). Each write is one single-row INSERT in its own
transaction; its latency runs from the start of that transaction until the row is readable on
*both* other replicas. The waiter wakes on the receivers' commit notifications
(`db.on_commit`, which merges fire) and re-checks at least every millisecond, so it adds no
polling delay of its own worth mentioning.
"""

from __future__ import annotations

import threading
import time

import sync

from .data import INSERT_EVENT, Workspace, event_rows
from .harness import BenchError, Row
from .replication import TOKEN, server_url

__all__ = ["b5_live", "P50_LIMIT_MS", "P99_LIMIT_MS", "Watcher", "wait_visible", "percentile"]

P50_LIMIT_MS, P99_LIMIT_MS = 10.0, 50.0
_WARMUP = 10
_VISIBLE_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 15.0


class Watcher:
    """Tells when a row is readable on one replica, woken by that replica's commits."""

    def __init__(self, db):
        self.db = db
        self.changed = threading.Event()
        self._remove = db.on_commit(self.changed.set)

    def visible(self, event_id: str) -> bool:
        with self.db.reading() as s:
            return s.scalar("SELECT 1 FROM events WHERE id = ?", (event_id,)) is not None

    def close(self) -> None:
        self._remove()


def wait_visible(watchers: list[Watcher], event_id: str, started: float, *, label: str = "B5",
                 timeout: float = _VISIBLE_TIMEOUT) -> list[float]:
    """Seconds from `started` until `event_id` is readable on each watcher's replica.

    Raises:
        BenchError: it never arrived within the timeout.
    """
    arrived: dict[int, float] = {}
    deadline = started + timeout
    while len(arrived) < len(watchers):
        for index, watcher in enumerate(watchers):
            if index in arrived:
                continue
            watcher.changed.clear()
            if watcher.visible(event_id):
                arrived[index] = time.perf_counter() - started
        if len(arrived) == len(watchers):
            break
        if time.perf_counter() > deadline:
            raise BenchError(f"{label}: event {event_id} did not reach every replica within {timeout:g} s")
        pending = next(w for i, w in enumerate(watchers) if i not in arrived)
        pending.changed.wait(0.001)
    return [arrived[i] for i in range(len(watchers))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _measure(replicas, writes: int, start: int) -> tuple[list[float], dict[str, list[float]]]:
    """Run the writes; (latency to both others per write, latencies by origin)."""
    watchers = [Watcher(db) for db in replicas]
    names = ["A", "B", "C"]
    latencies: list[float] = []
    by_origin: dict[str, list[float]] = {n: [] for n in names}
    try:
        for i, row in enumerate(event_rows(writes, start=start)):
            origin = i % 3
            others = [w for j, w in enumerate(watchers) if j != origin]
            started = time.perf_counter()
            with replicas[origin].transaction() as tx:
                tx.execute(INSERT_EVENT, row)
            latency = max(wait_visible(others, row[0], started))
            latencies.append(latency)
            by_origin[names[origin]].append(latency)
    finally:
        for watcher in watchers:
            watcher.close()
    return latencies, by_origin


def b5_live(ctx, writes: int) -> list[Row]:
    """B5: p50 and p99 of commit → visible on the two other replicas."""
    what = f"live: commit on 1 of 3 replicas -> visible on the other two ({writes:,} writes)"
    ws: Workspace = ctx.ws
    replicas = [ws.fresh(f"b5-{name}") for name in "abc"]
    server = clients = None
    try:
        server = sync.serve(replicas[0], "127.0.0.1", 0, token=TOKEN)
        clients = [sync.connect(db, server_url(server), token=TOKEN) for db in replicas[1:]]
        for client in clients:
            client.wait_connected(_CONNECT_TIMEOUT)
        _measure(replicas, _WARMUP, start=0)  # connections, statements and caches warm
        latencies, by_origin = _measure(replicas, writes, start=_WARMUP)
    finally:
        for client in clients or ():
            client.close()
        if server is not None:
            server.close()
        for db in replicas:
            ws.discard(db)
    ms = [v * 1000 for v in latencies]
    p50, p99 = percentile(ms, 0.50), percentile(ms, 0.99)
    extra = {
        "writes": writes, "max_ms": max(ms), "mean_ms": sum(ms) / len(ms),
        "by_origin_p50_ms": {k: percentile([x * 1000 for x in v], 0.5) for k, v in by_origin.items() if v},
        "by_origin_p99_ms": {k: percentile([x * 1000 for x in v], 0.99) for k, v in by_origin.items() if v},
        "topology": "A serves; B and C are live clients of A; writes rotate A, B, C",
    }
    note = "1 run; each write is a sample; origin B/C needs a relay through A"
    return [
        Row(id="B5-p50", what=what, unit="ms", ours=p50, baseline=None, ratio=None,
            target=f"p50 <= {P50_LIMIT_MS:g} ms", met=p50 <= P50_LIMIT_MS, reps=1, samples_ours=ms,
            notes=note, extra=extra),
        Row(id="B5-p99", what="  same run, 99th percentile", unit="ms", ours=p99, baseline=None, ratio=None,
            target=f"p99 <= {P99_LIMIT_MS:g} ms", met=p99 <= P99_LIMIT_MS, reps=1),
    ]
