"""Timing, result rows, the printed table and the results file.

A benchmark is a pair of trials, *ours* and *baseline*: functions that set up fresh data
outside the timer, time only the work, and return a `Sample`. `measure_pair` runs them
alternately (ours first on even repetitions, baseline first on odd ones, so warm caches and
drift favour neither) and keeps every sample; a row reports the medians and their ratio.

Wall-clock time is the figure (what a user waits for). The process's CPU time is recorded
next to it: on a shared machine other processes stretch wall time at random, while the CPU
ratio stays put, so a row's notes give the CPU ratio too.

When a trial is asked to `check`, it also returns a digest of the data it produced; the two
digests must agree, so a figure is never reported for work that did not happen.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Iterator

import msgspec

__all__ = [
    "BenchError",
    "Sample",
    "Pair",
    "Row",
    "Trial",
    "measure_pair",
    "measure_one",
    "ratio_row",
    "stopwatch",
    "median",
    "render_table",
    "machine_facts",
    "write_results",
    "db_digest",
    "rss_kb",
    "reset_peak_rss",
]


class BenchError(Exception):
    """A benchmark could not produce an honest figure (ours and baseline disagree, a replica
    never received a change, ...). The message says which benchmark and why."""


class Sample(msgspec.Struct, frozen=True):
    """One timed run: wall and CPU seconds of work, plus (when checked) a digest of the data
    produced."""

    seconds: float
    cpu: float
    digest: str | None = None


class Pair(msgspec.Struct):
    """Every sample of one benchmark: wall and CPU seconds, ours and the baseline's."""

    ours: list[float]
    baseline: list[float]
    ours_cpu: list[float]
    baseline_cpu: list[float]


Trial = Callable[[bool], Sample]


class Row(msgspec.Struct):
    """One line of the table and one entry of results.json. Figures are in `unit`; a row
    whose API is missing has `ours` None and says why in `notes`."""

    id: str
    what: str
    unit: str
    ours: float | None
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None
    reps: int = 0
    samples_ours: list[float] = []
    samples_baseline: list[float] = []
    notes: str = ""
    extra: dict[str, Any] = {}
    details: list[str] = []  # lines printed after the table (e.g. B5's hop breakdown)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed: ...` then `elapsed` is [wall seconds, CPU seconds of this
    process, all threads] — `Sample(*elapsed)`."""
    elapsed: list[float] = []
    cpu, start = time.process_time(), time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.extend((time.perf_counter() - start, time.process_time() - cpu))


def measure_pair(name: str, ours: Trial, baseline: Trial, reps: int) -> Pair:
    """Run both trials `reps` times, alternating which goes first; return every sample.

    The first repetition is checked: both trials return a digest of what they produced.

    Raises:
        BenchError: the two digests differ (ours did not produce what the baseline did).
    """
    pair = Pair([], [], [], [])
    for rep in range(reps):
        check = rep == 0
        order = (ours, baseline) if rep % 2 == 0 else (baseline, ours)
        digests = {}
        for trial in order:
            sample = trial(check)
            mine = trial is ours
            (pair.ours if mine else pair.baseline).append(sample.seconds)
            (pair.ours_cpu if mine else pair.baseline_cpu).append(sample.cpu)
            digests[mine] = sample.digest
        if check and digests[True] != digests[False]:
            raise BenchError(f"{name}: ours and the baseline produced different data "
                             f"(digest {digests[True]} vs {digests[False]})")
    return pair


def measure_one(trial: Trial, reps: int) -> list[float]:
    """Seconds of `reps` runs of one trial (a benchmark without a baseline)."""
    return [trial(rep == 0).seconds for rep in range(reps)]


def ratio_row(id: str, what: str, pair: Pair, *, limit: float | None, unit: str = "s", scale: float = 1.0,
              notes: str = "", extra: dict | None = None) -> Row:
    """A row of medians (times `scale`, in `unit`); `limit` is the target ratio (None: report
    only). The CPU-time ratio goes into the notes and `extra`."""
    ours_m, base_m = median(pair.ours) * scale, median(pair.baseline) * scale
    ratio = ours_m / base_m if base_m else None
    met = None if limit is None or ratio is None else ratio <= limit
    base_cpu = median(pair.baseline_cpu)
    cpu_ratio = median(pair.ours_cpu) / base_cpu if base_cpu else None
    cpu_note = "" if cpu_ratio is None else f"CPU-time ratio {cpu_ratio:.2f}"
    return Row(id=id, what=what, unit=unit, ours=ours_m, baseline=base_m, ratio=ratio,
               target="report only" if limit is None else f"ratio <= {limit:g}", met=met,
               reps=len(pair.ours), samples_ours=[v * scale for v in pair.ours],
               samples_baseline=[v * scale for v in pair.baseline],
               notes="; ".join(n for n in (cpu_note, notes) if n),
               extra={"cpu_ratio": cpu_ratio, "cpu_seconds_ours": pair.ours_cpu,
                      "cpu_seconds_baseline": pair.baseline_cpu, **(extra or {})})


# -- data digests ----------------------------------------------------------------------------


def db_digest(connection, tables: Iterable[str], *, clock_rows: bool = False) -> str:
    """A hash of the tables' rows (ordered by primary key) and, with `clock_rows`, of the
    cr-sqlite change metadata that must survive a copy (everything but db_version/seq, which
    the receiver re-stamps)."""
    digest = hashlib.blake2b(digest_size=12)
    for table in tables:
        for row in connection.execute(f'SELECT * FROM "{table}" ORDER BY 1'):
            digest.update(repr(row).encode())
    if clock_rows:
        for row in connection.execute(
                'SELECT "table", pk, cid, val, col_version, site_id, cl FROM crsql_changes'
                ' ORDER BY "table", pk, cid'):
            digest.update(repr(row).encode())
    return digest.hexdigest()


# -- memory ------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/self/status has no {field}")


def rss_kb() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in KiB (Linux)."""
    return _status_kb("VmRSS"), _status_kb("VmHWM")


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# -- output ------------------------------------------------------------------------------------

_HEADERS = ("id", "what", "ours", "baseline", "ratio", "target", "met?")


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _cells(row: Row) -> tuple[str, ...]:
    met = "-" if row.met is None else ("yes" if row.met else "NO")
    if row.ours is None and row.notes.startswith("not available"):
        return row.id, row.what, row.notes, "-", "-", row.target, met
    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
    return (row.id, row.what, _figure(row.ours, row.unit), _figure(row.baseline, row.unit), ratio,
            row.target, met)


def render_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (pastes into the README and the issue as is), followed
    by the rows' notes and details."""
    cells = [_HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADERS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    notes = [f"  {r.id}: {r.notes}" for r in rows if r.notes and not r.notes.startswith("not available")]
    details = [line for r in rows for line in [""] + r.details if r.details]
    return "\n".join(lines + ([""] + notes if notes else []) + details)


def machine_facts() -> dict[str, Any]:
    """The machine and the versions every figure depends on."""
    import apsw
    import websockets

    from engine.database import connect

    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    connection = connect(":memory:")
    try:
        crsqlite = connection.execute("SELECT crsql_sha()").fetchall()[0][0]
        connection.execute("SELECT crsql_finalize()").fetchall()
    finally:
        connection.close()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "memory_total_mb": _meminfo_mb("MemTotal"),
        "python": sys.version.split()[0],
        "apsw": apsw.apswversion(),
        "sqlite": apsw.sqlite_lib_version(),
        "msgspec": msgspec.__version__,
        "websockets": websockets.__version__,
        "cr-sqlite": crsqlite.lstrip("v"),
    }


def _meminfo_mb(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def write_results(path: str, machine: dict, settings: dict, rows: list[Row]) -> None:
    """Write every figure, sample and fact as JSON (indented, for diffs and reading)."""
    document = {"machine": machine, "settings": settings, "rows": rows}
    with open(path, "wb") as handle:
        handle.write(msgspec.json.format(msgspec.json.encode(document), indent=2))
        handle.write(b"\n")
