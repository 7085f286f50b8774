"""Multi-replica conflict tests for any CRR schema: clusters, a faulty network, schedules.

    from sync.testing import Cluster, Faults
    with Cluster(3, schema_dir="my_app/migrations", seed=1, faults=Faults(drop=0.1)) as cluster:
        cluster.write(0, "INSERT INTO notes (id, body) VALUES ('n1', 'hi')")
        cluster.partition([[0, 1], [2]])
        cluster.sync_all()
        cluster.heal()
        cluster.sync_all()
        cluster.assert_converged()

Modules:
    cluster    Cluster: replicas in temp files, sync rounds, partitions, restarts, the schedule
    network    the simulated network: Faults (random, seeded) and per-message faults
    diff       ConvergenceError / Difference: the first differing table, row and column;
               rows(db) and assert_converged(dbs) for databases outside a cluster
    schedules  steps as plain data, run_schedule, and the Hypothesis strategies
    plugin     the pytest plugin: `cluster` / `replicas` fixtures, the `cluster` marker,
               --cluster-seed / --cluster-replicas, replay sections in failure reports

Stands on `engine.database` and `sync` only, like the rest of `sync`; Hypothesis is
imported only when a strategy is built.
"""

from __future__ import annotations

from .cluster import START_MS, Cluster, NotQuiescentError
from .diff import MISSING, ConvergenceError, Difference, assert_converged, rows
from .network import Delay, Disconnect, Drop, Duplicate, Faults, Link, MessageFault, Reorder, Round, Sent
from .schedules import (
    Advance,
    Heal,
    Op,
    Partition,
    Restart,
    Sql,
    Step,
    Sync,
    SyncAll,
    run_schedule,
    schedules,
    sql_op,
)

__all__ = [
    "Cluster",
    "NotQuiescentError",
    "START_MS",
    "ConvergenceError",
    "Difference",
    "MISSING",
    "assert_converged",
    "rows",
    "Faults",
    "MessageFault",
    "Drop",
    "Duplicate",
    "Reorder",
    "Delay",
    "Disconnect",
    "Round",
    "Link",
    "Sent",
    "Step",
    "Op",
    "Sql",
    "Sync",
    "SyncAll",
    "Partition",
    "Heal",
    "Restart",
    "Advance",
    "run_schedule",
    "schedules",
    "sql_op",
]
