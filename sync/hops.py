"""Where the time of a change goes on its way between replicas, hop by hop.

Off unless the environment variable `SYNC_HOPS` is set to something other than "" or "0" when
`sync` is imported (the benchmarks set it for their agent processes). When off, a timing point
costs one attribute read (`hops.ENABLED`) and nothing else:

    if hops.ENABLED:
        started = hops.now()
    ...
    if hops.ENABLED:
        hops.since("read", started)

Hops, in the order a live write travels (a relay repeats the first five on the middle peer):

    notify   a commit through this database ended -> the connection was woken (the database's
             change notifier: WAL hook, its thread, its listeners)
    loop     the connection was woken -> its loop asks the session for pages (the loop's inbox)
    read     the session reads the next page from crsql_changes (Outbox.next_page)
    encode   the page becomes wire bytes
    send     a frame (a page, or an ack on the way back) is written to the socket
    handoff  the socket's reader thread received a frame -> the loop takes it from the inbox
    decode   wire bytes become a message
    merge    validation, INSERT INTO crsql_changes, watermark and merge listeners, before COMMIT
    commit   COMMIT of the merging transaction (and the database's commit listeners)

Times are per process (one registry per interpreter), in nanoseconds of `time.perf_counter_ns()`,
which is CLOCK_MONOTONIC on Linux and so comparable between the processes of one machine.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

__all__ = ["ENABLED", "HOPS", "now", "since", "add", "take"]

ENABLED = os.environ.get("SYNC_HOPS", "") not in ("", "0")
HOPS = ("notify", "loop", "read", "encode", "send", "handoff", "decode", "merge", "commit")

now = time.perf_counter_ns
_lock = threading.Lock()
_samples: dict[str, list[int]] = {}


def add(hop: str, nanoseconds: int) -> None:
    """Record one duration of `hop` (callable from any thread)."""
    with _lock:
        _samples.setdefault(hop, []).append(nanoseconds)


def since(hop: str, started: int) -> int:
    """Record the time from `started` (a `now()` value) until now as one duration of `hop`;
    returns now (the start of the next hop)."""
    ended = now()
    add(hop, ended - started)
    return ended


def take() -> dict[str, dict[str, float]]:
    """Every hop's count, sum, median, 99th percentile and maximum (microseconds) since the last
    call; clears the samples."""
    global _samples
    with _lock:
        samples, _samples = _samples, {}
    summary = {}
    for hop, values in samples.items():
        ordered = sorted(values)
        summary[hop] = {
            "count": len(ordered),
            "sum_us": sum(ordered) / 1e3,
            "p50_us": statistics.median(ordered) / 1e3,
            "p99_us": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] / 1e3,
            "max_us": ordered[-1] / 1e3,
        }
    return summary
