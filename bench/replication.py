"""B3, B4, B6, B7: moving changes between replicas, against the raw copy.

The baseline (bench.data.raw_copy) is the floor any sync built on cr-sqlite has: read the
changes from `crsql_changes` and merge them with `executemany(INSERT INTO crsql_changes)` in
one transaction. Ours is `sync.Peer(b).sync_with(...)` pulling a source replica's changes
into a fresh replica: paging, encoding, watermarks, framing and (B4) the socket included;
B4's server runs in a process of its own (bench.agent), as deployed.
Both start from the same source replica into fresh replicas, and the first repetition checks
that both receivers end up with the same rows and the same change metadata.

B6 and B7 use the in-process transport, like B3. B6 also runs one sync of each kind in a
child process (bench.memory) to measure the peak RSS growth in isolation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sync

from .agent import Remote
from .data import CRR_TABLES, TOKEN, Workspace, count_changes, raw_copy
from .harness import BenchError, Pair, Row, Sample, db_digest, measure_pair, ratio_row, stopwatch

__all__ = ["b3_in_process", "b4_websocket", "b6_initial_sync", "b7_scaling", "sync_trials", "sync_facts",
           "receiver_digest", "B3_LIMIT", "B4_LIMIT", "AUDIT_LIMIT"]

REPO = Path(__file__).resolve().parent.parent
B3_LIMIT, B4_LIMIT, AUDIT_LIMIT = 1.1, 1.0, 1.1
_RSS_LIMIT_MB = 150
_LINEAR_LIMIT = 1.3


def receiver_digest(db) -> str:
    return db_digest(db.connection, CRR_TABLES, clock_rows=True)


def sync_trials(ws: Workspace, source, pull, *, audit: bool = True):
    """Ours and the baseline for one source: `pull(receiver_db)` runs our sync and returns
    its result object; `audit` turns the receiver's conflict audit on for ours."""
    results: list = []

    def ours(check: bool) -> Sample:
        db = ws.fresh("recv-ours", audit=audit)
        with stopwatch() as elapsed:
            results.append(pull(db))
        digest = receiver_digest(db) if check else None
        ws.discard(db)
        return Sample(*elapsed, digest=digest)

    def baseline(check: bool) -> Sample:
        db = ws.fresh("recv-raw")
        with stopwatch() as elapsed:
            raw_copy(source, db)
        digest = receiver_digest(db) if check else None
        ws.discard(db)
        return Sample(*elapsed, digest=digest)

    return ours, baseline, results


def _in_process(ctx, changes: int) -> tuple[Pair, dict]:
    """Measure in-process sync vs raw copy for a source of `changes` (cached per size)."""
    key = ("in-process", changes)
    if key not in ctx.cache:
        source = ctx.ws.source(changes)
        source_peer = sync.Peer(source)
        ours, baseline, results = sync_trials(ctx.ws, source, lambda db: sync.Peer(db).sync_with(source_peer))
        reps = ctx.reps_for(changes)
        pair = measure_pair(f"sync of {changes:,} changes", ours, baseline, reps)
        ctx.cache[key] = (pair, sync_facts(source, results))
    return ctx.cache[key]


def sync_facts(source, results: list) -> dict:
    pulled = {getattr(r, "pulled", None) for r in results}
    return {"changes": count_changes(source), "db_versions": source.db_version, "pulled": sorted(pulled, key=str)}


def _reps_note(ctx, changes: int) -> str:
    reps = ctx.reps_for(changes)
    return f"median of {reps} (fewer repetitions for 1M-change rows)" if reps < ctx.reps else ""


def b3_in_process(ctx, changes: int) -> list[Row]:
    """B3: in-process `Peer.sync_with` vs raw copy; B3-audit: the same sync with the
    receiver's conflict audit on vs off."""
    what = f"sync {changes:,} changes A->B, in-process (vs raw copy)"
    pair, facts = _in_process(ctx, changes)
    source = ctx.ws.source(changes)
    source_peer = sync.Peer(source)
    pull = lambda db: sync.Peer(db).sync_with(source_peer)  # noqa: E731
    audited, _, _ = sync_trials(ctx.ws, source, pull)
    plain, _, _ = sync_trials(ctx.ws, source, pull, audit=False)
    audit = measure_pair("B3-audit", audited, plain, ctx.reps)
    return [ratio_row("B3", what, pair, limit=B3_LIMIT, extra=facts),
            ratio_row("B3-audit", "  same sync, receiver's conflict audit on (vs off)", audit, limit=AUDIT_LIMIT)]


def b4_websocket(ctx, changes: int) -> list[Row]:
    """B4: `Peer.sync_with("ws://...")` against `sync.serve` running in another process
    (bench.agent) on loopback vs the in-process raw copy."""
    what = f"sync {changes:,} changes A->B over WebSocket, two processes (vs raw copy)"
    source = ctx.ws.source(changes)
    with Remote("b4-server") as server:
        server.call("open", path=source.path)
        url = server.call("serve")
        ours, baseline, results = sync_trials(ctx.ws, source, lambda db: sync.Peer(db).sync_with(url, token=TOKEN))
        pair = measure_pair("B4", ours, baseline, ctx.reps_for(changes))
    return [ratio_row("B4", what, pair, limit=B4_LIMIT, extra=sync_facts(source, results),
                      notes="CPU-time ratio counts this process only")]


def b6_initial_sync(ctx, changes: int) -> list[Row]:
    """B6: the 1M-change initial sync: time ratio, and peak RSS growth measured in a child."""
    what = f"initial sync of {changes:,} changes, in-process (vs raw copy)"
    pair, facts = _in_process(ctx, changes)
    rows = [ratio_row("B6", what, pair, limit=1.3, notes=_reps_note(ctx, changes), extra=facts)]
    source = ctx.ws.source(changes)
    ours_mem, base_mem = _child_rss(ctx.ws, source, "ours"), _child_rss(ctx.ws, source, "raw")
    growth, base_growth = ours_mem["growth_mb"], base_mem["growth_mb"]
    rows.append(Row(id="B6-rss", what="peak RSS growth during that sync (child process, 1 run)", unit="MB",
                    ours=growth, baseline=base_growth, ratio=growth / base_growth if base_growth > 0 else None,
                    target=f"ours <= {_RSS_LIMIT_MB} MB", met=growth <= _RSS_LIMIT_MB, reps=1,
                    extra={"ours": ours_mem, "baseline": base_mem}))
    return rows


def _child_rss(ws: Workspace, source, mode: str) -> dict:
    """Run one sync (`ours` or `raw`) of `source` in a fresh interpreter; its report."""
    target = ws.path(f"rss-{mode}")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.memory", mode, source.path, str(target)],
        cwd=REPO, capture_output=True, text=True, timeout=3600)
    for suffix in ("", "-wal", "-shm"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)
    if completed.returncode != 0:
        raise BenchError(f"bench.memory {mode} failed: {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def b7_scaling(ctx, sizes: tuple[int, ...]) -> list[Row]:
    """B7: per-change cost of in-process sync (and of the raw copy) at each size."""
    rows, ours_cost, base_cost = [], [], []
    for size in sizes:
        pair, facts = _in_process(ctx, size)
        n = facts["changes"]
        row = ratio_row(f"B7-{_short(size)}", f"sync cost per change at {n:,} changes", pair,
                        limit=None, unit="us/change", scale=1e6 / n, notes=_reps_note(ctx, size), extra=facts)
        row.target = "linear (see B7)"
        rows.append(row)
        ours_cost.append(row.ours)
        base_cost.append(row.baseline)
    growth, base_growth = ours_cost[-1] / ours_cost[0], base_cost[-1] / base_cost[0]
    rows.append(Row(id="B7", what=f"per-change cost growth, {_short(sizes[-1])} vs {_short(sizes[0])}",
                    unit="x", ours=growth, baseline=base_growth, ratio=None,
                    target=f"ours <= {_LINEAR_LIMIT}x (linear)", met=growth <= _LINEAR_LIMIT,
                    reps=rows[0].reps))
    return rows


def _short(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1_000 and size % 1_000 == 0:
        return f"{size // 1_000}k"
    return str(size)
