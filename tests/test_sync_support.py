"""SQL helpers shared by the sync tests (imported as `test_sync_support`), and the checks of
the network the sync tests drive rounds through.

Everything runs on the real migrations and the real extension; writes are raw SQL on the
CRR tables because sync must not depend on the stores. Rounds over a faulty network, replica
clusters and table comparisons come from the public toolkit `sync.testing` (the lossy
channel these tests once had privately moved there).
"""

from __future__ import annotations

from engine import Database
from sync.testing import Cluster, Disconnect

__all__ = ["state", "write", "topic"]


def write(db: Database, sql: str, params: tuple = ()) -> None:
    """One statement in its own transaction."""
    with db.transaction() as tx:
        tx.execute(sql, params)


def topic(db: Database, id: str, name: str = "", workflow_id: str = "wf") -> None:
    write(db, "INSERT INTO topics (id, workflow_id, name) VALUES (?, ?, ?)", (id, workflow_id, name))


def state(db: Database, table: str = "topics") -> list[tuple]:
    with db.reading() as s:
        return s.execute(f'SELECT * FROM "{table}" ORDER BY 1')


def test_the_network_delivers_a_clean_round():
    with Cluster(2) as cluster:
        a, b = cluster.replica(0), cluster.replica(1)
        topic(a, "t1", "one")
        rnd = cluster.sync(1, 0)
        assert rnd.ok and rnd.error is None
        assert [len(p.rows) for p in rnd.pages(sender=0)] == [3]
        assert state(b) == state(a) == [("t1", "wf", "one", 0)]


def test_the_network_can_stop_mid_round():
    with Cluster(2) as cluster:
        a, b = cluster.replica(0), cluster.replica(1)
        topic(a, "t1")
        rnd = cluster.sync(1, 0, faults=[Disconnect(after=2)])
        assert not rnd.ok
        assert state(b) == []
