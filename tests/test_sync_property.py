"""Property: whatever the writes, partial syncs, lost/duplicated/reordered/late messages, cut
connections, partitions and restarts, a final full sync leaves every CRR table identical everywhere.

3-5 replicas on the real schema; writes are raw SQL on the CRR tables (sync must not
depend on the stores). Schedules come from sync.testing: rounds go through its simulated
network, encoded and decoded as on a wire, with the faults each Sync step names plus a
light layer of random faults drawn from the cluster's seed. A failure shrinks to a short
schedule that replays exactly. The default run is short; SYNC_PROPERTY_EXAMPLES=200 raises
the example count.
"""

from __future__ import annotations

import os
from itertools import permutations
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Database
from sync import ProtocolError
from sync.changes import Limits
from sync.watermarks import watermarks
from sync.errors import TransportError
from sync.testing import Cluster, Faults, Step, Sync, SyncAll, run_schedule, schedules

EXAMPLES = int(os.environ.get("SYNC_PROPERTY_EXAMPLES", "10"))
KEYS = [f"k{i}" for i in range(6)]
LIMITS = Limits(page_changes=8)  # small pages: multi-page rounds and split transactions
NOISE = Faults(drop=0.03, duplicate=0.03, reorder=0.1, delay=0.1)


class Write(msgspec.Struct, frozen=True):
    """One write transaction on a replica: insert/update/delete a row, or a bulk insert
    bigger than a page (it goes as parts)."""

    kind: str
    table: str
    key: str
    value: Any

    def __call__(self, db: Database) -> None:
        table, key, value = self.table, self.key, self.value
        column = "name" if table == "topics" else "title"
        with db.transaction() as tx:
            if self.kind == "insert":
                tx.execute(f"INSERT INTO {table} (id, {column}) VALUES (?, ?) "
                           f"ON CONFLICT (id) DO UPDATE SET {column} = excluded.{column}", (key, value))
            elif self.kind == "update":
                tx.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (value, key))
            elif self.kind == "delete":
                tx.execute(f"DELETE FROM {table} WHERE id = ?", (key,))
            else:  # one transaction bigger than a page: goes as parts
                for suffix in range(4):
                    tx.execute(f"INSERT OR REPLACE INTO {table} (id, {column}) VALUES (?, ?)",
                               (f"{key}-{suffix}", value))


writes = st.builds(
    Write,
    st.sampled_from(["insert", "update", "delete", "bulk"]),
    st.sampled_from(["topics", "events"]),
    st.sampled_from(KEYS),
    st.one_of(st.text(max_size=8), st.integers(-5, 5), st.binary(max_size=4)),
)
histories = st.integers(3, 5).flatmap(
    lambda n: st.tuples(st.just(n), schedules(writes, n_replicas=n, min_steps=4, max_steps=30, max_message=30)))


def check_round(cluster: Cluster, step: Step) -> None:
    """After each step: only the network's doing may fail a round, never a merge (a gap or
    vanished staged parts would be a bug); no merge is left open between rounds and no watermark
    runs ahead of the db_version it stands for."""
    if not isinstance(step, (Sync, SyncAll)):
        return
    error = cluster.last_round.error if isinstance(step, Sync) else None
    if error is not None:
        assert isinstance(error, (ProtocolError, TransportError)), error
        assert "gap" not in str(error) and "vanished" not in str(error)
    versions = {db.site_id: db.db_version for db in cluster.replicas}
    for db in cluster.replicas:
        assert not db.connection.in_transaction
        for mark in watermarks(db):
            assert mark.received <= versions[mark.site_id]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories)
def test_replicas_converge_after_any_history(history):
    count, schedule = history
    with Cluster(count, limits=LIMITS, faults=NOISE) as cluster:
        run_schedule(cluster, schedule, after_step=check_round)
        cluster.converge()  # heal, sync every pair over a perfect network, identical tables
        # converged: nothing left takes effect anywhere
        assert sum(cluster.sync(a, b).applied for a, b in permutations(range(count), 2)) == 0
