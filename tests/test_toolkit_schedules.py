"""Schedules as data (steps, run_schedule) and the Hypothesis strategies of sync.testing:
generated schedules are valid and converge on the engine's schema, and a deliberately
failing property shrinks to a short, readable schedule."""

from __future__ import annotations

import logging
import os

import msgspec
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import sync.testing as toolkit
from engine import Database
from sync.testing import (
    Advance,
    Cluster,
    ConvergenceError,
    Delay,
    Disconnect,
    Drop,
    Heal,
    Op,
    Partition,
    Restart,
    Sql,
    Sync,
    SyncAll,
    run_schedule,
    schedules,
    sql_op,
)

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "20"))
IDS = st.sampled_from(["t0", "t1", "t2"])
NAMES = st.text("ab", max_size=2)
OPERATIONS = [
    sql_op("INSERT OR REPLACE INTO topics (id, name) VALUES (?, ?)", IDS, NAMES),
    sql_op("UPDATE topics SET name = ? WHERE id = ?", NAMES, IDS),
    sql_op("DELETE FROM topics WHERE id = ?", IDS),
]
INSERT = "INSERT OR REPLACE INTO topics (id, name) VALUES (?, ?)"


@pytest.fixture(autouse=True)
def quiet_sync_log(caplog):
    caplog.set_level(logging.ERROR, logger="sync")


class InsertLocally(msgspec.Struct, frozen=True):
    """A buggy operation: it inserts a topic with cr-sqlite's triggers switched off, so the
    row never reaches another replica."""

    id: str

    def __call__(self, db: Database) -> None:
        with db.transaction() as tx:
            tx.execute("SELECT crsql_internal_sync_bit(1)")
            tx.execute("INSERT OR REPLACE INTO topics (id, name) VALUES (?, 'local')", (self.id,))
            tx.execute("SELECT crsql_internal_sync_bit(0)")


def test_run_schedule_executes_and_records_every_kind_of_step():
    schedule = [
        Op(0, Sql(INSERT, ("t0", "a"))),
        Partition(((0, 1), (2,))),
        Op(2, Sql(INSERT, ("t2", "c"))),
        Sync(0, 1, faults=(Drop(3),)),
        Sync(1, 0),
        Sync(2, 0),
        Restart(1),
        Advance(250),
        Heal(),
        SyncAll(),
    ]
    with Cluster(3) as cluster:
        run_schedule(cluster, schedule)
        cluster.assert_converged()
        assert cluster.clock.now_ms() == toolkit.START_MS + 250
        assert cluster.state(1)["topics"] == [("t0", "", "a", 0), ("t2", "", "c", 0)]
        lines = cluster.schedule
    assert lines[1] == "r0: Sql(sql='INSERT OR REPLACE INTO topics (id, name) VALUES (?, ?)', params=('t0', 'a'))"
    assert lines[2] == "partition [[0, 1], [2]]"
    assert lines[4].startswith("sync r0<->r1: FAILED") and "#3 r1->r0 changes[0] dropped" in lines[4]
    assert lines[5] == "sync r1<->r0: ok, pulled 3, pushed 0 (7 messages)"
    assert lines[6] == "sync r2<->r0: blocked by the partition"
    assert lines[7:10] == ("restart r1", "clock +250 ms", "heal")
    assert lines[10] == "sync_all:" and lines[-2].startswith("sync_all: quiescent")
    assert all(line.startswith("  sync ") for line in lines[11:-2])


def test_bad_indices_are_refused_before_anything_runs():
    with Cluster(2) as cluster:
        with pytest.raises(ValueError, match="names replica 2"):
            run_schedule(cluster, [Op(0, Sql(INSERT, ("t0", "a"))), Sync(0, 2)])
        assert cluster.query(0, "SELECT count(*) FROM topics") == [(0,)]


def test_expected_errors_are_recorded_and_the_schedule_goes_on():
    def fails(db: Database) -> None:
        raise LookupError("no such note")

    seen = []
    with Cluster(2) as cluster:
        run_schedule(cluster, [Op(1, fails), Op(0, Sql(INSERT, ("t0", "a"))), Sync(1, 0)],
                     expected_errors=(LookupError,), after_step=lambda c, step: seen.append((step, c.last_round)))
        assert cluster.schedule[1].endswith("fails -> raised LookupError: no such note")
        assert [type(step) for step, _ in seen] == [Op, Op, Sync]
        assert seen[1][1] is None and seen[2][1].pulled == 3
        with pytest.raises(LookupError):
            run_schedule(cluster, [Op(1, fails)])


def test_step_reprs_are_the_python_that_builds_them():
    schedule = [
        Op(1, Sql(INSERT, ("t0", "a"))),
        Sync(0, 2, faults=(Drop(3), Delay(1, ticks=20), Disconnect(after=4))),
        Partition(((0,), (1, 2))),
        SyncAll(),
        Heal(),
        Restart(2),
        Advance(10),
    ]
    text = repr(schedule)
    assert "Sync(a=0, b=2, faults=(Drop(at=3), Delay(at=1, ticks=20), Disconnect(after=4)))" in text
    assert eval(text, vars(toolkit)) == schedule


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules(OPERATIONS, n_replicas=3, max_steps=20))
def test_generated_schedules_are_valid_and_the_engine_converges(schedule):
    for step in schedule:
        if isinstance(step, Sync):
            assert step.a != step.b and {step.a, step.b} <= {0, 1, 2}
        if isinstance(step, Partition):
            assert sorted(i for group in step.groups for i in group) == [0, 1, 2]
    with Cluster(3) as cluster:
        run_schedule(cluster, schedule)
        cluster.converge()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules(OPERATIONS, n_replicas=2, faults=False, partitions=False, restarts=False,
                          sync_all=False, clock=False, min_steps=5, max_steps=6))
def test_the_strategy_can_leave_out_kinds_of_steps(schedule):
    assert 5 <= len(schedule) <= 6
    assert {type(step) for step in schedule} <= {Op, Sync}
    assert all(step.faults == () for step in schedule if isinstance(step, Sync))


def test_a_strategy_needs_a_replica():
    with pytest.raises(ValueError, match="n_replicas"):
        schedules(OPERATIONS, n_replicas=0)


def test_a_failing_property_shrinks_to_a_short_readable_schedule():
    """The property "the replicas converge" fails as soon as InsertLocally runs; whatever
    Hypothesis finds first (syncs with faults, partitions, restarts, clock moves around it)
    must shrink to the one step that matters, printed as the Python that builds it."""
    operations = OPERATIONS + [st.builds(InsertLocally, IDS)]
    failing: list[int] = []
    errors: list[str] = []

    def diverges(schedule) -> bool:
        with Cluster(2) as cluster:
            run_schedule(cluster, schedule)
            try:
                cluster.converge()
            except ConvergenceError as error:
                failing.append(len(schedule))
                errors.append(str(error))
                return True
        return False

    found = find(schedules(operations, n_replicas=2, max_steps=10), diverges,
                 settings=settings(database=None, max_examples=100, derandomize=True, deadline=None))
    assert found == [Op(0, InsertLocally("t0"))]
    assert repr(found) == "[Op(replica=0, op=InsertLocally(id='t0'))]"
    assert max(failing) > 3  # the first failures were longer: shrinking did the work
    assert "replicas diverge: table topics, row (id='t0')" in errors[-1]
