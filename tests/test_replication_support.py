"""Replicas for the replicated-execution tests (imported as `test_replication_support`), on the
public toolkit `sync.testing`, plus checks of what these suites rely on from it.

`open_replicas` opens a `Cluster` whose replicas each have their own ManualClock (at START)
and the after-merge audit installed — again after a restart, through the cluster's `setup`
hook. `Replica` is a view of one of them under the names these suites use (`db`, `clock`,
`peer`, `site_id`, `sync_with`); it follows restarts. Full syncs, table snapshots and the
convergence check are the toolkit's (`Cluster.sync_all`, `sync.testing.rows`,
`Cluster.assert_converged`, which names the first differing row and column).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Database, ManualClock
from engine.replication import _audit_merge
from sync import Peer
from sync.testing import START_MS, Cluster, NotQuiescentError, Round, rows

__all__ = ["Replica", "open_replicas", "close_all", "sync_until_quiet", "assert_converged", "START"]

START = START_MS


class Replica:
    """Replica `index` of `cluster`: its database, sync peer (the audit installed) and own clock."""

    def __init__(self, cluster: Cluster, index: int):
        self.cluster, self.index = cluster, index

    @property
    def db(self) -> Database:
        return self.cluster.replica(self.index)

    @property
    def clock(self) -> ManualClock:
        return self.cluster.clocks[self.index]

    @property
    def peer(self) -> Peer:
        return self.cluster.peer(self.index)

    @property
    def site_id(self) -> str:
        return self.db.site_id

    def sync_with(self, other: "Replica") -> Round:
        """One round through the cluster's network, this replica the client."""
        return self.cluster.sync(self.index, other.index)

    def __repr__(self) -> str:
        return f"<replica {self.index} {self.site_id[:8]}>"


def open_replicas(directory: str | Path | None, n: int, *, seed: int = 0) -> list[Replica]:
    """n fresh replicas (files in `directory`, a temp folder if None), each with its own
    ManualClock at START. Close them with `close_all`."""
    clocks = [ManualClock(START) for _ in range(n)]
    cluster = Cluster(n, clock=clocks, directory=directory, seed=seed)
    return [Replica(cluster, index) for index in range(n)]


def close_all(replicas: list[Replica]) -> None:
    replicas[0].cluster.close()


def sync_until_quiet(replicas: list[Replica], pairs: list[tuple[int, int]] | None = None) -> list[Round]:
    """`Cluster.sync_all` over `pairs` (all pairs by default): rounds until none moves anything
    (the audit's own repairs are changes too, so this may take a few passes).

    Raises:
        NotQuiescentError: still moving changes after the toolkit's round budget.
    """
    return replicas[0].cluster.sync_all(pairs=pairs)


def assert_converged(replicas: list[Replica]) -> dict[str, list[tuple]]:
    """Every CRR table identical on these replicas (naming the first difference); returns the state."""
    replicas[0].cluster.assert_converged(replicas=[r.index for r in replicas])
    return rows(replicas[0].db)


# -- what these suites rely on ------------------------------------------------------------------


def every(replicas: list[Replica], read) -> object:
    """`read(db)` on every replica, asserting they agree; returns the common value."""
    values = [read(r.db) for r in replicas]
    assert all(v == values[0] for v in values), values
    return values[0]


def no_violations(replicas: list[Replica]) -> None:
    for replica in replicas:
        assert replica.db.execution.check_invariants() == [], replica


@pytest.fixture
def three(tmp_path):
    replicas = open_replicas(tmp_path, 3)
    yield replicas
    close_all(replicas)


def test_replicas_get_distinct_site_ids_own_clocks_and_the_audit(three):
    assert len({r.site_id for r in three}) == 3
    assert [r.db.merge_listeners for r in three] == [[_audit_merge]] * 3  # on by default, once
    three[1].clock.advance(7)
    assert [r.clock.now_ms() - START for r in three] == [0, 7, 0]
    three[2].cluster.restart(2)
    assert three[2].db.merge_listeners == [_audit_merge]  # on again for the reopened database


def test_sync_until_quiet_converges_and_fails_loudly_when_told_to_stop_early(three):
    three[0].db.events.publish("wf", "inbox", "m1", {})
    three[2].db.events.publish("wf", "inbox", "m2", {})
    rounds = sync_until_quiet(three)
    assert rounds[-1].moved == 0 and sum(r.moved for r in rounds) > 0  # moving rounds, then quiet ones
    state = assert_converged(three)
    assert len(state["events"]) == 2
    three[1].db.events.publish("wf", "inbox", "m3", {})
    with pytest.raises(NotQuiescentError, match="after 1 rounds"):
        three[0].cluster.sync_all(max_rounds=1)
