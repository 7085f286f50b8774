"""`make bench`: run the benchmarks, print the table, write bench/results.json.

    python bench/run.py                      # everything, full sizes
    python bench/run.py B1,B2                # a selection (also: make bench BENCH=B1,B2)
    BENCH_QUICK=1 python bench/run.py B1     # small sizes, 2 repetitions: a smoke run
    python bench/run.py --reps 7 --out /tmp/r.json

Every figure is a median over repetitions (5 by default; the 1M-change rows use fewer, see
`--large-reps`, and say so in their notes). A benchmark that fails prints a "failed:" row and
makes the exit status 1; one whose code does not exist yet prints "not available:". With
`--strict` a missed target also exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import bulk, handshake, live, replication, stores  # noqa: E402
from bench.data import Workspace  # noqa: E402
from bench.harness import Row, machine_facts, render_table, write_results  # noqa: E402

__all__ = ["main", "BENCHMARKS", "SIZES"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"

# id -> sizes (full, quick). Counts are events for B1/B2/B8, changes for B3/B4/B6/B7, writes for B5,
# rounds per sample for B10.
SIZES = {
    "B1": (20_000, 300),
    "B2": (20_000, 300),
    "B3": (200_000, 3_000),
    "B4": (200_000, 3_000),
    "B5": (1_000, 30),
    "B6": (1_000_000, 12_000),
    "B7": ((10_000, 100_000, 1_000_000), (1_000, 4_000, 12_000)),
    "B8": (20_000, 1_000),  # events rows in one transaction (12 changes each); quick still splits a page
    "B10": (200, 10),
}

BENCHMARKS = {
    "B1": lambda ctx, size: stores.b1_publish(ctx.ws, size, ctx.reps),
    "B2": lambda ctx, size: stores.b2_crr_cost(ctx.ws, size, ctx.reps),
    "B3": lambda ctx, size: replication.b3_in_process(ctx, size),
    "B4": lambda ctx, size: replication.b4_websocket(ctx, size),
    "B5": lambda ctx, size: live.b5_live(ctx, size),
    "B6": lambda ctx, size: replication.b6_initial_sync(ctx, size),
    "B7": lambda ctx, size: replication.b7_scaling(ctx, size),
    "B8": lambda ctx, size: bulk.b8_huge_transaction(ctx, size),
    "B10": lambda ctx, size: handshake.b10_handshake(ctx, size),
}

_WHAT = {
    "B1": "publish through db.events.publish",
    "B2": "CRR INSERT vs plain schema",
    "B3": "sync in-process vs raw copy",
    "B4": "sync over WebSocket vs raw copy",
    "B5": "live propagation, 3 replicas",
    "B6": "initial sync of 1M changes",
    "B7": "sync scaling",
    "B8": "one huge transaction: in-process and WebSocket vs the floor",
    "B10": "handshake overhead: token, keys, keys + TLS",
}


class Context:
    """What every benchmark gets: the workspace, repetitions, quick flag and a shared cache
    (B6 and B7 share the 1M-change measurement)."""

    def __init__(self, ws: Workspace, reps: int, large_reps: int, quick: bool):
        self.ws, self.reps, self.large_reps, self.quick = ws, reps, large_reps, quick
        self.cache: dict = {}

    def reps_for(self, changes: int) -> int:
        return self.large_reps if changes >= 500_000 else self.reps


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description="Benchmarks vs their baselines (DESIGN.md §10).")
    parser.add_argument("only", nargs="?", default=os.environ.get("BENCH", ""),
                        help="comma-separated ids, e.g. B1,B3 (default: $BENCH, else all)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                        help="small sizes and 2 repetitions (also: BENCH_QUICK=1)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per benchmark (default 5, quick 2)")
    parser.add_argument("--large-reps", type=int, default=None,
                        help="repetitions for 1M-change rows (default 3, quick as --reps)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default bench/results.json)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


def _selection(only: str) -> list[str]:
    wanted = [part.strip().upper() for part in only.split(",") if part.strip()] or list(BENCHMARKS)
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return wanted


def _run_one(bench_id: str, ctx: Context) -> list[Row]:
    size = SIZES[bench_id][1 if ctx.quick else 0]
    started = time.perf_counter()
    print(f"[bench] {bench_id} ({_WHAT[bench_id]}) ...", file=sys.stderr, flush=True)
    try:
        rows = BENCHMARKS[bench_id](ctx, size)
    except Exception as error:  # a broken benchmark must not hide the others' figures
        traceback.print_exc(file=sys.stderr)
        rows = [Row(id=bench_id, what=_WHAT[bench_id], unit="", ours=None, baseline=None, ratio=None,
                    target="-", met=None, notes=f"failed: {type(error).__name__}: {error}")]
    print(f"[bench] {bench_id} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the selection; return the exit status (1 if a benchmark failed, or with --strict
    if a target was missed)."""
    args = _parse(argv)
    selected = _selection(args.only)
    reps = args.reps or (2 if args.quick else 5)
    large_reps = args.large_reps or (reps if args.quick else 3)
    machine = machine_facts()
    load_before = os.getloadavg()
    rows: list[Row] = []
    with Workspace() as ws:
        ctx = Context(ws, reps, large_reps, args.quick)
        for bench_id in selected:
            rows.extend(_run_one(bench_id, ctx))
    settings = {"selected": selected, "quick": args.quick, "reps": reps, "large_reps": large_reps,
                "sizes": {b: SIZES[b][1 if args.quick else 0] for b in selected},
                # Other processes share these cores; a high load average means noisier figures.
                "load_average_before": load_before, "load_average_after": os.getloadavg()}
    write_results(args.out, machine, settings, rows)
    print(f"\n{machine['date']} · {machine['cpu_count']} × {machine['cpu_model']} · Python {machine['python']}"
          f" · SQLite {machine['sqlite']} · cr-sqlite {machine['cr-sqlite']}"
          f" · load avg {load_before[0]:.1f} -> {settings['load_average_after'][0]:.1f}"
          f"{' · QUICK MODE (smoke sizes, not figures)' if args.quick else ''}\n")
    print(render_table(rows))
    print(f"\nresults: {args.out}")
    failed = any(r.notes.startswith("failed") for r in rows)
    missed = any(r.met is False for r in rows)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
