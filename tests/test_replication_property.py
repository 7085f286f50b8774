"""Property: the execution model run on random replicas, with random partial syncs, converges.

Three replicas (each with its own manual clock) run random steps of the execution model —
claim, publish, start, prepare, begin/apply/fail a mutation, commit, fail, retry, recover —
on two workflows, and sync random pairs in between (so replicas work partitioned and claim
the same workflow concurrently). The second test adds deletes (runs by session, topics with
their events, handler state) and restarts. After a full sync every CRR table is identical
everywhere, `check_invariants()` is empty on every replica, one replica owns each workflow,
no published message is lost (unless its topic was deleted), and no run that was seen ended
on a replica is ever seen active there again.

`REPLICATION_EXAMPLES` raises the number of examples (default 25: a few seconds).
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_replication_support import assert_converged, close_all, open_replicas, sync_until_quiet

from engine import AlreadyExistsError, InvalidTransitionError, NotFoundError, NotOwnerError
from engine.execution import FAILURE_STATUSES
from engine.topics import topic_id

EXAMPLES = int(os.environ.get("REPLICATION_EXAMPLES", "25"))
N = 3
WORKFLOWS = ("w1", "w2")
MESSAGES = ("m0", "m1", "m2", "m3")
# Replica files are many and short-lived: in memory-backed /dev/shm when there is one.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
REFUSED = (NotOwnerError, InvalidTransitionError, NotFoundError, AlreadyExistsError)

replica = st.integers(0, N - 1)
workflow = st.sampled_from(WORKFLOWS[:1] * 3 + WORKFLOWS[1:])
pick = st.integers(0, 7)
session = st.sampled_from(["s0", "s1", "s2"])
steps = st.one_of(
    st.tuples(st.just("claim"), replica, workflow),
    st.tuples(st.just("publish"), replica, workflow, st.sampled_from(MESSAGES)),
    st.tuples(st.just("publish"), replica, workflow, st.sampled_from(MESSAGES)),
    st.tuples(st.just("start"), replica, workflow, st.sampled_from(["consumer", "consumer", "producer"]), session),
    st.tuples(st.just("prepare"), replica, pick, st.integers(1, 3)),
    st.tuples(st.just("prepare"), replica, pick, st.integers(1, 3)),
    st.tuples(st.just("mutate"), replica, pick),
    st.tuples(st.just("settle"), replica, pick, st.booleans()),
    st.tuples(st.just("commit"), replica, pick),
    st.tuples(st.just("commit"), replica, pick),
    st.tuples(st.just("fail"), replica, pick, st.sampled_from(FAILURE_STATUSES)),
    st.tuples(st.just("retry"), replica, pick),
    st.tuples(st.just("recover"), replica, workflow),
    st.tuples(st.just("work"), replica, workflow, st.sampled_from(MESSAGES), st.integers(1, 3), session),
    st.tuples(st.just("work"), replica, workflow, st.sampled_from(MESSAGES), st.integers(1, 3), session),
    st.tuples(st.just("sync"), replica, replica),
    st.tuples(st.just("tick"), replica, st.integers(1, 50)),
)
# Deletes racing the model (README, "Deletes under concurrency") and replicas restarting.
rough_steps = st.one_of(
    steps,
    st.tuples(st.just("delete_session"), replica, session),
    st.tuples(st.just("delete_topic"), replica, workflow),
    st.tuples(st.just("delete_state"), replica, workflow),
    st.tuples(st.just("restart"), replica),
)


# Which local runs each step may pick from (the k-th of them, modulo their number), so that
# most steps do something instead of being refused for the wrong phase.
ELIGIBLE = {
    "prepare": "handler_type = 'consumer' AND status = 'active' AND phase IN ('pending', 'preparing')",
    "mutate": "handler_type = 'consumer' AND status = 'active' AND phase = 'prepared'",
    "settle": "id IN (SELECT handler_run_id FROM mutations WHERE status IN ('in_flight', 'needs_reconcile'))",
    "commit": "status = 'active'",
    "fail": "status = 'active'",
    "retry": "handler_type = 'consumer' AND status NOT IN ('active', 'committed')"
             " AND phase NOT IN ('pending', 'preparing', 'prepared')",
}


class World:
    """The replicas plus what the test remembers: messages published, and the statuses each
    replica was seen to hold for ended runs."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.published: set[tuple[str, str]] = set()
        self.ended: list[dict[str, str]] = [{} for _ in replicas]
        self.deleted: set[str] = set()  # workflows whose topic some replica deleted

    def pick(self, db, step: str, k: int) -> str | None:
        """The k-th (mod their count) run of this replica eligible for `step`, or None."""
        with db.reading() as s:
            ids = [r[0] for r in s.execute(f"SELECT id FROM handler_runs WHERE {ELIGIBLE[step]} ORDER BY id")]
        return ids[k % len(ids)] if ids else None

    def apply(self, step: tuple) -> None:
        name, r, *args = step
        try:
            getattr(self, f"_{name}")(self.replicas[r], self.replicas[r].db, *args)
        except REFUSED:
            pass
        self._watch_terminal(r)

    def _claim(self, replica, db, wf):
        db.ownership.claim(wf)

    def _publish(self, replica, db, wf, message):
        db.events.publish(wf, "inbox", message, {"from": replica.index})
        self.published.add((wf, message))

    def _start(self, replica, db, wf, kind, session):
        db.execution.start_run(script_run_id=session, workflow_id=wf, handler_type=kind, handler_name=kind)

    def _prepare(self, replica, db, k, n):
        """Reserve (up to) the n oldest messages this replica sees pending, as a handler would."""
        if (run := self.pick(db, "prepare", k)) is None:
            return
        wf = db.handler_runs.get(run).workflow_id
        messages = [e.message_id for e in db.events.peek(wf, "inbox", limit=n)] or ["m0"]
        db.execution.prepare_consumer(run, reservations={"inbox": messages}, prepare_result={"n": len(messages)})

    def _work(self, replica, db, wf, message, n, session):
        """What a handler loop does in one go: a message arrives, a consumer run starts and
        reserves the n oldest pending messages."""
        self._publish(replica, db, wf, message)
        run = db.execution.start_run(script_run_id=session, workflow_id=wf, handler_type="consumer",
                                     handler_name="consumer")
        messages = [e.message_id for e in db.events.peek(wf, "inbox", limit=n)] or [message]
        db.execution.prepare_consumer(run.id, reservations={"inbox": messages}, prepare_result={"n": n})

    def _mutate(self, replica, db, k):
        if (run := self.pick(db, "mutate", k)) is not None:
            db.execution.begin_mutation(run, tool_namespace="t", tool_method="m", params={})

    def _settle(self, replica, db, k, applied):
        if (run := self.pick(db, "settle", k)) is None:
            return
        mutation = db.mutations.get_by_run(run)
        if applied:
            db.execution.apply_mutation(mutation.id, {"ok": True})
        else:
            db.execution.fail_mutation(mutation.id, "refused")

    def _commit(self, replica, db, k):
        if (run_id := self.pick(db, "commit", k)) is None:
            return
        run = db.handler_runs.get(run_id)
        with db.transaction() as tx:
            if run.handler_type == "producer":
                db.execution.commit_producer(run.id, state={"by": replica.index}, tx=tx)
                return
            if run.phase == "mutated" and db.ownership.is_local_owner(run.workflow_id, tx=tx):
                db.handler_runs.set_phase(run.id, "emitting", tx=tx)
            db.execution.commit_consumer(run.id, state={"by": replica.index}, tx=tx)

    def _fail(self, replica, db, k, status):
        if (run := self.pick(db, "fail", k)) is not None:
            db.execution.fail_run(run, status, error="random failure")

    def _retry(self, replica, db, k):
        if (run := self.pick(db, "retry", k)) is not None:
            db.execution.create_retry_run(run)

    def _recover(self, replica, db, wf):
        db.execution.recover_crashed_runs(wf)

    def _sync(self, replica, db, other):
        if other != replica.index:
            replica.sync_with(self.replicas[other])

    def _tick(self, replica, db, ms):
        replica.clock.advance(ms)

    def _delete_session(self, replica, db, session):
        db.handler_runs.delete_by_session(session)

    def _delete_topic(self, replica, db, wf):
        with db.transaction() as tx:
            db.events.delete_by_topic(topic_id(wf, "inbox"), tx=tx)
            db.topics.delete(topic_id(wf, "inbox"), tx=tx)
        self.deleted.add(wf)

    def _delete_state(self, replica, db, wf):
        for name in ("consumer", "producer"):
            db.handler_state.delete(wf, name)

    def _restart(self, replica, db):
        """Close the replica and open its file again (the cluster installs the audit anew)."""
        replica.cluster.restart(replica.index)

    def _watch_terminal(self, r: int) -> None:
        with self.replicas[r].db.reading() as s:
            statuses = dict(s.execute("SELECT id, status FROM handler_runs"))
        for run, status in statuses.items():
            before = self.ended[r].get(run)
            assert not (before and status == "active"), f"run {run} was {before} on replica {r}, now active again"
            if status != "active":
                self.ended[r][run] = status


def check_program(program) -> None:
    """Run the steps, sync everything, and check what every example must satisfy."""
    with tempfile.TemporaryDirectory(prefix="replication-property-", dir=SCRATCH) as directory:
        replicas = open_replicas(directory, N)
        try:
            world = World(replicas)
            for step in program:
                world.apply(step)
            sync_until_quiet(replicas)
            state = assert_converged(replicas)
            for replica in replicas:
                assert replica.db.execution.check_invariants() == [], f"replica {replica.index}"
            events = {(row[2], row[3]) for row in state["events"]}  # (workflow_id, message_id)
            assert {(wf, m) for wf, m in world.published if wf not in world.deleted} <= events
            for wf in WORKFLOWS:
                assert len({r.db.ownership.owner(wf) for r in replicas}) == 1
        finally:
            close_all(replicas)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=10, max_size=60))
def test_random_execution_on_random_replicas_converges_with_invariants_kept(program):
    check_program(program)


@settings(max_examples=max(EXAMPLES // 3, 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rough_steps, min_size=10, max_size=60))
def test_with_deletes_and_restarts_too(program):
    check_program(program)
