"""Does APSW let another thread run while SQLite works? Two measurements, printed.

    python -m bench.gil

1. A long single-step query (a recursive CTE: one sqlite3_step call, no rows until the end) in
   one thread, a pure-Python loop in another. If APSW releases the GIL around sqlite3_step, the
   two overlap on two cores: wall time of both together ~ the longer one, not their sum.
2. The sync floor pipelined inside one process: a reader thread SELECTs pages of a huge
   transaction's changes from one replica while the main thread merges the previous page into
   another (executemany INSERT INTO crsql_changes), against the same copy done serially.
   Row-by-row work hands the GIL over per row (every step releases and re-takes it), which is
   what pipelining across threads of one process can and cannot win.

Medians of 5 runs. Used by bench/PROFILE.md; not part of `make bench` (it measures the
platform, not our code).
"""

from __future__ import annotations

import queue
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import apsw  # noqa: E402

__all__ = ["step_overlap", "pipelined_copy", "main"]

_CTE = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
        "SELECT sum(x * x % 7) FROM c")
_REPS = 5


def _python_loop() -> None:
    total = 0
    for i in range(6_000_000):
        total += i * i % 7


def _wall(*work) -> float:
    threads = [threading.Thread(target=w) for w in work]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def step_overlap() -> dict[str, float]:
    """Seconds: the query alone, the loop alone, both at once in two threads."""
    connection = apsw.Connection(":memory:")
    query = lambda: connection.execute(_CTE).fetchall()  # noqa: E731
    samples = {"sql": [], "python": [], "both": []}
    for _ in range(_REPS):
        samples["sql"].append(_wall(query))
        samples["python"].append(_wall(_python_loop))
        samples["both"].append(_wall(query, _python_loop))
    connection.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def pipelined_copy(rows: int = 20_000) -> dict[str, float]:
    """Seconds of the raw copy of one `rows`-row transaction, serial and two-thread pipelined."""
    from bench.data import CHANGE_COLUMNS, INSERT_EVENT, Workspace, event_rows, raw_copy

    insert = f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    with Workspace() as ws:
        source = ws.source(rows * 12, rows_per_tx=rows)

        def pages():
            with source.reading() as s:
                cursor = s.connection.execute(f"SELECT {CHANGE_COLUMNS} FROM crsql_changes")
                page = []
                for row in cursor:
                    page.append(row)
                    if len(page) == 10_000:
                        yield page
                        page = []
                if page:
                    yield page

        def serial(db) -> None:
            with db.transaction() as tx:
                for page in pages():
                    tx.executemany(insert, page)

        def pipelined(db) -> None:
            handed: queue.Queue = queue.Queue(maxsize=2)
            reader = threading.Thread(target=lambda: [handed.put(p) for p in pages()] + [handed.put(None)])
            reader.start()
            with db.transaction() as tx:
                while (page := handed.get()) is not None:
                    tx.executemany(insert, page)
            reader.join()

        samples = {"floor (fetchall + executemany)": [], "serial pages": [], "pipelined pages": []}
        for _ in range(_REPS):
            for name, copy in zip(samples, (lambda db: raw_copy(source, db), serial, pipelined)):
                db = ws.fresh("gil")
                started = time.perf_counter()
                copy(db)
                samples[name].append(time.perf_counter() - started)
                ws.discard(db)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    overlap = step_overlap()
    serial = overlap["sql"] + overlap["python"]
    print(f"sqlite3_step alone {overlap['sql']:.3f} s, Python loop alone {overlap['python']:.3f} s, "
          f"both in two threads {overlap['both']:.3f} s (serial would be {serial:.3f} s): "
          f"overlap {serial / overlap['both']:.2f}x of 2.00x possible")
    for name, seconds in pipelined_copy().items():
        print(f"copy of 240,000 changes, {name}: {seconds:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
