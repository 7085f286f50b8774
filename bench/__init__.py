"""`make bench`: each benchmark timed next to its baseline, in one process, on the same data.

    bench.run          the command line: selection, quick mode, the table, bench/results.json
    bench.harness      timing (alternating pairs, medians), result rows, table, machine facts
    bench.data         fresh temp replicas, generated event rows, source replicas of N changes,
                       the raw-copy baseline
    bench.stores       B1 (publish vs raw INSERT), B2 (CRR vs plain table)
    bench.replication  B3, B4, B6, B7 (sync vs raw copy, in-process and WebSocket; RSS; scaling)
    bench.live         B5 (live propagation latency between three replicas)
    bench.memory       the child process that measures peak RSS of one sync in isolation

Benchmarks never run under pytest (DESIGN.md §10); tests/test_bench_smoke.py only checks that
the harness runs in quick mode.
"""

__all__: list[str] = []
