"""B9: fan-out from one writer to ten replicas — NATS JetStream (sync.nats) vs our WebSocket hub.

Both topologies have a broker between the writer and the receivers, and every replica runs in
this process on loopback:

    NATS  writer ─▶ nats-server -js (stream CRDT_bench) ─▶ 10 replicas, a durable consumer each
    hub   writer ─▶ hub replica (sync.serve)             ─▶ 10 replicas, live clients (sync.connect)

Two measurements per topology, on fresh replicas:
- latency: single-row INSERTs of `events`, one transaction each, one at a time; a write's
  latency runs from the start of its transaction until the row is readable on all ten
  receivers (the waiter wakes on their commits, as in B5);
- rate: a burst of single-row transactions written as fast as the writer commits; changes per
  second from the first commit until the last row is readable on all ten.
Each topology runs `reps` times (fresh replicas and a fresh server or hub each time), alternating
which goes first.

"ours" is NATS and the "baseline" our hub, so the ratio says how NATS compares (rate: higher
is better; latency: lower is better). Report only: the point is the comparison.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sync
import sync.nats
from sync.testing.nats_server import LocalNatsServer

from .data import CHANGES_PER_EVENT, INSERT_EVENT, TOKEN, Workspace, event_rows
from .harness import BenchError, Row, median, percentile

__all__ = ["b9_fanout", "RECEIVERS"]

RECEIVERS = 10
_WARMUP = 10
_CONNECT_TIMEOUT = 30.0
_BURST_TIMEOUT = 120.0
_VISIBLE_TIMEOUT = 10.0


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


def wait_visible(watchers: list[Watcher], event_id: str, started: float, *,
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
            raise BenchError(f"B9: event {event_id} did not reach every replica within {timeout:g} s")
        pending = next(w for i, w in enumerate(watchers) if i not in arrived)
        pending.changed.wait(0.001)
    return [arrived[i] for i in range(len(watchers))]


@contextmanager
def _over_nats(ws: Workspace, replicas: list) -> Iterator[None]:
    with LocalNatsServer(tempfile.mkdtemp(prefix="b9-nats-", dir=ws.folder)) as server:  # a fresh store
        started = [sync.nats.replicate(db, server.url, name="bench") for db in replicas]
        try:
            for replica in started:
                replica.wait_connected(_CONNECT_TIMEOUT)
            yield
        finally:
            for replica in started:
                replica.close()


@contextmanager
def _over_hub(ws: Workspace, replicas: list) -> Iterator[None]:
    hub = ws.fresh("b9-hub")
    server = sync.serve(hub, "127.0.0.1", 0, token=TOKEN)
    clients = []
    try:
        clients = [sync.connect(db, server.url, token=TOKEN) for db in replicas]
        for client in clients:
            client.wait_connected(_CONNECT_TIMEOUT)
        yield
    finally:
        for client in clients:
            client.close()
        server.close()
        ws.discard(hub)


def _latencies(writer, watchers: list[Watcher], rows: list[tuple]) -> list[float]:
    """Seconds from each write's start until it is readable on every receiver."""
    latencies = []
    for row in rows:
        started = time.perf_counter()
        with writer.transaction() as tx:
            tx.execute(INSERT_EVENT, row)
        latencies.append(max(wait_visible(watchers, row[0], started)))
    return latencies


def _burst(writer, watchers: list[Watcher], receivers: list, rows: list[tuple]) -> tuple[float, float]:
    """(wall, CPU) seconds from the first commit of the burst until its last row is on every
    receiver (each origin's transactions arrive in order, so the last one implies the others).
    The CPU time is this process's, all threads: steadier than wall time on a shared machine.

    Raises:
        BenchError: a receiver holds the last row but not every row of the burst.
    """
    cpu, started = time.process_time(), time.perf_counter()
    for row in rows:
        with writer.transaction() as tx:
            tx.execute(INSERT_EVENT, row)
    seconds = max(wait_visible(watchers, rows[-1][0], started, timeout=_BURST_TIMEOUT))
    cpu = time.process_time() - cpu
    ids = (rows[0][0], rows[-1][0])
    for db in receivers:
        with db.reading() as s:
            held = s.scalar("SELECT count(*) FROM events WHERE id BETWEEN ? AND ?", ids)
        if held != len(rows):
            raise BenchError(f"B9: a receiver holds {held} of the burst's {len(rows)} events")
    return seconds, cpu


def _measure(ctx, kind: str, burst: int, writes: int) -> tuple[list[float], tuple[float, float]]:
    """(latencies in seconds, (wall, CPU) seconds of the burst) of one topology on fresh replicas."""
    ws: Workspace = ctx.ws
    writer = ws.fresh(f"b9-{kind}-writer")
    receivers = [ws.fresh(f"b9-{kind}-r{i}") for i in range(RECEIVERS)]
    topology = _over_nats if kind == "nats" else _over_hub
    watchers = [Watcher(db) for db in receivers]
    try:
        with topology(ws, [writer, *receivers]):
            _latencies(writer, watchers, event_rows(_WARMUP, start=0))
            latencies = _latencies(writer, watchers, event_rows(writes, start=_WARMUP))
            burst_seconds = _burst(writer, watchers, receivers, event_rows(burst, start=_WARMUP + writes))
    finally:
        for watcher in watchers:
            watcher.close()
        for db in [writer, *receivers]:
            ws.discard(db)
    return latencies, burst_seconds


def b9_fanout(ctx, sizes: tuple[int, int]) -> list[Row]:
    """B9: rate and p50/p99 fan-out latency, NATS vs hub; `ctx.reps` runs of each, alternating
    which goes first. Rates are medians over runs; latencies pool every run's writes."""
    burst, writes = sizes
    rates: dict[str, list[float]] = {"nats": [], "hub": []}
    cpu: dict[str, list[float]] = {"nats": [], "hub": []}
    latencies: dict[str, list[float]] = {"nats": [], "hub": []}
    changes = burst * CHANGES_PER_EVENT
    for rep in range(ctx.reps):
        for kind in ("nats", "hub") if rep % 2 == 0 else ("hub", "nats"):
            run_latencies, (seconds, cpu_seconds) = _measure(ctx, kind, burst, writes)
            rates[kind].append(changes / seconds)
            cpu[kind].append(cpu_seconds)
            latencies[kind] += [v * 1000 for v in run_latencies]
    nats_rate, hub_rate = median(rates["nats"]), median(rates["hub"])
    cpu_ratio = median(cpu["nats"]) / median(cpu["hub"])
    note = (f"median of {ctx.reps} runs each, alternating; CPU-time ratio of the burst {cpu_ratio:.2f}; "
            f"NATS = ours, our WebSocket hub = baseline; {RECEIVERS} receivers in this process")
    extra = {"receivers": RECEIVERS, "burst_events": burst, "burst_changes": changes, "latency_writes": writes,
             "rates_nats": rates["nats"], "rates_hub": rates["hub"], "cpu_seconds_nats": cpu["nats"],
             "cpu_seconds_hub": cpu["hub"], "cpu_ratio": cpu_ratio}
    rows = [Row(id="B9-rate", what=f"fan-out 1 -> {RECEIVERS}: burst of {burst:,} single-row txs, changes/s",
                unit="changes/s", ours=nats_rate, baseline=hub_rate, ratio=nats_rate / hub_rate,
                target="report only", met=None, reps=ctx.reps, samples_ours=rates["nats"],
                samples_baseline=rates["hub"], notes=note, extra=extra)]
    for q, label in ((0.50, "p50"), (0.99, "p99")):
        ours, base = percentile(latencies["nats"], q), percentile(latencies["hub"], q)
        rows.append(Row(id=f"B9-{label}",
                        what=f"  fan-out latency {label}, commit -> on all {RECEIVERS} ({ctx.reps} x {writes:,} writes)",
                        unit="ms", ours=ours, baseline=base, ratio=ours / base, target="report only", met=None,
                        reps=ctx.reps, samples_ours=latencies["nats"] if label == "p50" else [],
                        samples_baseline=latencies["hub"] if label == "p50" else []))
    return rows
