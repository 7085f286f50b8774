"""B5: live propagation through a hub, every replica in a process of its own.

Topology: agent A serves (`sync.serve`), agents B and C are live clients of A (`sync.connect`);
three interpreters, so three GILs, as deployed. Writes rotate over A, B and C; each is one
single-row INSERT in its own transaction. A write's latency to a replica runs from the start of
that transaction on the origin until the commit that made the row visible on the receiver
(stamped there by a commit listener; perf_counter_ns is one clock for all processes):

    hub -> client    origin A, received by B and by C (one hop)
    client -> hub    origin B or C, received by A (one hop)
    relay            origin B, received by C through A (and C -> A -> B): two hops
    both             the later of the two receivers of each write (the first B5 rows)

A second, shorter run with `SYNC_HOPS=1` in the agents prints where a hop's time goes (sync.hops:
notify, loop, read, encode, send, hand-off, decode, merge, commit) per process. The latency
figures come from the first run, which has the timing points switched off. The replicas run
with the conflict audit on, like every sync row (bench.data); it adds ~130 us to a merge
(bench/PROFILE.md). A receiver's `commit` hop includes the benchmark's own visibility check
(one SELECT in a commit listener, after the commit time it reports).
"""

from __future__ import annotations

import os
import statistics

from .agent import Remote
from .data import Workspace, event_rows
from .harness import Row, percentile

__all__ = ["b5_live", "P50_LIMIT_MS", "P99_LIMIT_MS", "HUB_P50_LIMIT_MS", "RELAY_P50_LIMIT_MS",
           "RELAY_P99_LIMIT_MS"]

P50_LIMIT_MS, P99_LIMIT_MS = 10.0, 50.0
HUB_P50_LIMIT_MS = 1.0
RELAY_P50_LIMIT_MS, RELAY_P99_LIMIT_MS = 1.5, 5.0
_WARMUP = 30
_VISIBLE_TIMEOUT = 10.0
_NAMES = ("A", "B", "C")


class _Cluster:
    """Three agent processes: A serving, B and C live clients of A."""

    def __init__(self, ws: Workspace, *, hops: bool):
        env = {**os.environ, "SYNC_HOPS": "1" if hops else "0"}
        self.agents: list[Remote] = []
        try:
            for name in _NAMES:
                agent = Remote(f"b5-{name}", env=env, timeout=60)
                self.agents.append(agent)
                agent.call("open", path=str(ws.path(f"b5-{name.lower()}")))
            url = self.agents[0].call("serve")
            for agent in self.agents[1:]:
                agent.send("connect", url=url)
            for agent in self.agents[1:]:
                agent.reply()
        except BaseException:
            self.close()
            raise

    def write(self, origin: int, row: tuple) -> dict[int, float]:
        """Write `row` on agent `origin`; milliseconds until it is committed on each other agent."""
        receivers = [i for i in range(3) if i != origin]
        for i in receivers:
            self.agents[i].send("expect", id=row[0])
        for i in receivers:
            self.agents[i].reply()
        started = self.agents[origin].call("write", row=list(row))
        arrived = {}
        for i in receivers:
            event_id, ns = self.agents[i].seen(_VISIBLE_TIMEOUT)
            assert event_id == row[0], (event_id, row[0])
            arrived[i] = (ns - started) / 1e6
        return arrived

    def hops(self) -> dict[str, dict]:
        return {name: agent.call("hops") for name, agent in zip(_NAMES, self.agents)}

    def close(self) -> None:
        for agent in reversed(self.agents):
            agent.close()


def _run(cluster: _Cluster, writes: int, start: int) -> dict[str, list[float]]:
    """The writes, rotating origins; latencies (ms) by path."""
    paths: dict[str, list[float]] = {"hub->client": [], "client->hub": [], "relay": [], "both": []}
    for i, row in enumerate(event_rows(writes, start=start)):
        origin = i % 3
        arrived = cluster.write(origin, row)
        paths["both"].append(max(arrived.values()))
        if origin == 0:
            paths["hub->client"] += [arrived[1], arrived[2]]
        else:
            paths["client->hub"].append(arrived[0])
            paths["relay"].append(arrived[3 - origin])
    return paths


def b5_live(ctx, writes: int) -> list[Row]:
    """B5: latency percentiles by path, and the per-hop breakdown of a second run."""
    ws: Workspace = ctx.ws
    cluster = _Cluster(ws, hops=False)
    try:
        _run(cluster, _WARMUP, start=0)  # connections, statements and caches warm
        paths = _run(cluster, writes, start=_WARMUP)
    finally:
        cluster.close()
    details = _breakdown(ws, max(30, writes // 3))
    summary = {path: {"p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99), "max_ms": max(v),
                      "samples": len(v)} for path, v in paths.items()}
    extra = {"writes": writes, "paths": summary,
             "topology": "three processes: A serves; B and C are live clients of A; writes rotate A, B, C"}
    note = "1 run of 3 processes; each write is a sample"

    def row(id: str, what: str, path: str, q: float, limit: float | None, **more) -> Row:
        value = percentile(paths[path], q)
        return Row(id=id, what=what, unit="ms", ours=value, baseline=None, ratio=None,
                   target="report only" if limit is None else f"p{round(q * 100)} <= {limit:g} ms",
                   met=None if limit is None else value <= limit, reps=1, **more)

    return [
        row("B5-p50", f"live: commit on 1 of 3 replicas -> visible on the other two ({writes:,} writes)",
            "both", 0.5, P50_LIMIT_MS, samples_ours=paths["both"], notes=note, extra=extra),
        row("B5-p99", "  same run, 99th percentile", "both", 0.99, P99_LIMIT_MS),
        row("B5-hub-p50", "  hub -> client (one hop), median", "hub->client", 0.5, HUB_P50_LIMIT_MS),
        row("B5-hub-p99", "  hub -> client, 99th percentile", "hub->client", 0.99, None),
        row("B5-relay-p50", "  client -> hub -> client (relay), median", "relay", 0.5, RELAY_P50_LIMIT_MS),
        row("B5-relay-p99", "  relay, 99th percentile", "relay", 0.99, RELAY_P99_LIMIT_MS,
            details=details),
    ]


def _breakdown(ws: Workspace, writes: int) -> list[str]:
    """Run `writes` writes with the hop timing on; the table of median hop times per process."""
    cluster = _Cluster(ws, hops=True)
    try:
        _run(cluster, _WARMUP, start=100_000)
        cluster.hops()  # drop the warm-up's samples
        paths = _run(cluster, writes, start=100_000 + _WARMUP)
        hops = cluster.hops()
    finally:
        cluster.close()
    from sync.hops import HOPS

    names = [h for h in HOPS if any(h in per for per in hops.values())]
    names += sorted({h for per in hops.values() for h in per} - set(names))
    lines = [f"B5 hop breakdown, second run with SYNC_HOPS=1 ({writes} writes; median µs per message, "
             "count in brackets):",
             f"  {'hop':<10}{'hub A':>16}{'client B':>16}{'client C':>16}"]
    for hop in names:
        cells = []
        for name in _NAMES:
            stats = hops[name].get(hop)
            cells.append("-" if stats is None else f"{stats['p50_us']:.0f} ({stats['count']})")
        lines.append(f"  {hop:<10}" + "".join(f"{cell:>16}" for cell in cells))
    lines.append("  end to end in this run (ms): " + ", ".join(
        f"{path} p50 {statistics.median(v):.2f}" for path, v in paths.items() if v))
    return lines
