"""The multi-replica conflict suite: replicas that work while partitioned, then sync through
`sync.Peer` with the after-merge audit installed. Each test states the exact converged state
and checks it on every replica.

cr-sqlite facts these expectations rest on (checked in test_crsqlite.py / test_sync_scenarios.py):
two writes of one column at the same column version resolve to the greater value, on every
replica; a column written more often (higher version) wins whatever its value.
"""

from __future__ import annotations

import pytest
from sync.testing import rows
from test_replication_support import (
    START,
    assert_converged,
    close_all,
    every,
    no_violations,
    open_replicas,
    sync_until_quiet,
)

from engine import InvalidTransitionError, NotOwnerError
from engine.events import event_id
from engine.topics import topic_id


@pytest.fixture
def pair(tmp_path):
    replicas = open_replicas(tmp_path, 2)
    yield replicas
    close_all(replicas)


@pytest.fixture
def trio(tmp_path):
    replicas = open_replicas(tmp_path, 3)
    yield replicas
    close_all(replicas)


def consumer(replica, wf="wf"):
    return replica.db.execution.start_run(script_run_id="s", workflow_id=wf, handler_type="consumer",
                                          handler_name="mailer")


def reserve(replica, run, *messages):
    return replica.db.execution.prepare_consumer(run.id, reservations={"inbox": list(messages)}, prepare_result=None)


def event_state(db, message, wf="wf"):
    event = db.events.get(event_id(topic_id(wf, "inbox"), message))
    return event.status, event.reserved_by_run_id, event.attempt_number


# -- natural keys -----------------------------------------------------------------------------


def test_same_topic_created_on_two_partitioned_replicas_is_one_topic(pair):
    a, b = pair
    b.clock.advance(5)
    made = [r.db.topics.get_or_create("wf", "inbox") for r in pair]
    assert made[0].id == made[1].id == topic_id("wf", "inbox")
    sync_until_quiet(pair)
    # created_at was written once on each side (same version): the greater value wins.
    assert every(pair, lambda db: rows(db)["topics"]) == [(made[0].id, "wf", "inbox", START + 5)]
    assert every(pair, lambda db: db.conflicts.list(status=None)) == []


def test_same_message_published_on_both_is_one_event_with_a_deterministic_payload(pair):
    a, b = pair
    a.db.events.publish("wf", "inbox", "m1", {"from": "a"}, title="from a")
    b.clock.advance(3)
    b.db.events.publish("wf", "inbox", "m1", {"from": "b"}, title="")
    sync_until_quiet(pair)
    events = every(pair, lambda db: db.events.peek("wf", "inbox", status=None))
    assert len(events) == 1
    event = events[0]
    # Each column resolves on its own to the greater value: payload from b, title from a.
    assert (event.payload, event.title, event.status, event.created_at, event.updated_at) == (
        {"from": "b"}, "from a", "pending", START + 3, START + 3)
    assert every(pair, lambda db: rows(db)["topics"]) == [(topic_id("wf", "inbox"), "wf", "inbox", START + 3)]
    no_violations(pair)


# -- ownership ----------------------------------------------------------------------------------


def test_both_claim_a_workflow_one_owner_and_the_losers_next_reserve_is_refused(pair):
    for replica in pair:
        assert replica.db.ownership.claim("wf") == replica.site_id
    sync_until_quiet(pair)
    # The claim is one JSON column {"owner": ..., "claimed_at": ...}: the greater text wins,
    # so the greater site id; never the owner of one claim with the time of the other.
    owner = max(r.site_id for r in pair)
    claims = every(pair, lambda db: db.ownership.list())
    assert [(c.workflow_id, c.owner, c.claim["claimed_at"]) for c in claims] == [("wf", owner, START)]
    winner, loser = sorted(pair, key=lambda r: r.site_id != owner)
    loser.db.events.publish("wf", "inbox", "m1", {})
    run = loser.db.handler_runs.create(script_run_id="s", workflow_id="wf", handler_type="consumer",
                                       handler_name="mailer")
    with pytest.raises(NotOwnerError) as refused:
        reserve(loser, run, "m1")
    assert (refused.value.workflow_id, refused.value.owner, refused.value.local) == ("wf", owner, loser.site_id)
    assert event_state(loser.db, "m1") == ("pending", "", 1)
    assert loser.db.handler_runs.get(run.id).phase == "pending"  # the whole step rolled back
    with pytest.raises(NotOwnerError):
        consumer(loser)
    loser.db.events.publish("wf", "inbox", "m2", {})  # publishing works on every replica
    sync_until_quiet(pair)
    won = consumer(winner)
    reserve(winner, won, "m1", "m2")
    assert event_state(winner.db, "m1") == ("reserved", won.id, 1)


@pytest.mark.parametrize("how", ["concurrent claims", "takeover"])
def test_owner_and_stale_replica_reserve_the_same_event_offline(pair, how):
    a, b = pair
    if how == "takeover":  # a owned the workflow; b takes it over while a is offline
        a.db.ownership.claim("wf")
        a.db.events.publish("wf", "inbox", "m1", {})
        a.db.events.publish("wf", "inbox", "m2", {})
        sync_until_quiet(pair)
        b.db.ownership.claim("wf", force=True)  # a second write of the claim: it wins
        owner, stale = b, a
    else:  # both claimed while partitioned; the greater site id wins
        for replica in pair:
            replica.db.ownership.claim("wf")
            replica.db.events.publish("wf", "inbox", "m1", {})
            replica.db.events.publish("wf", "inbox", "m2", {})
        owner, stale = sorted(pair, key=lambda r: r.site_id, reverse=True)
    stale.clock.advance(1)  # the stale replica's run is even the older one: ownership decides
    mine = consumer(owner)
    theirs = consumer(stale)
    reserve(owner, mine, "m1")
    reserve(stale, theirs, "m1", "m2")
    assert event_state(stale.db, "m1")[:2] == ("reserved", theirs.id)

    sync_until_quiet(pair)

    assert every(pair, lambda db: db.ownership.owner("wf")) == owner.site_id
    conflicts = every(pair, lambda db: db.conflicts.list(status=None))
    m1 = event_id(topic_id("wf", "inbox"), "m1")
    assert [(c.kind, c.workflow_id, c.subjects, c.status) for c in conflicts] == [
        ("double_reservation", "wf", sorted([m1, mine.id, theirs.id]), "open")]
    assert conflicts[0].detail == {"event": m1, "winner": mine.id, "losers": [theirs.id],
                                   "claims": {mine.id: "hold", theirs.id: "hold"}, "owner": owner.site_id}
    assert every(pair, lambda db: event_state(db, "m1")) == ("reserved", mine.id, 1)
    # The loser's other reservation was not contested: released (a repair, not an attempt).
    assert every(pair, lambda db: event_state(db, "m2")) == ("pending", "", 1)
    lost = every(pair, lambda db: db.handler_runs.get(theirs.id))
    assert (lost.status, lost.phase, lost.error_type) == ("crashed", "prepared", "conflict")
    assert lost.error == (f"stopped by conflict {conflicts[0].id} (double_reservation): "
                          f"event {m1} belongs to run {mine.id}")
    assert every(pair, lambda db: db.handler_runs.get(mine.id).status) == "active"
    no_violations(pair)

    owner.db.execution.commit_consumer(mine.id)
    with pytest.raises(InvalidTransitionError):
        stale.db.execution.commit_consumer(theirs.id)
    with pytest.raises(NotOwnerError):
        reserve(stale, stale.db.handler_runs.create(script_run_id="s", workflow_id="wf", handler_type="consumer",
                                                    handler_name="x"), "m2")
    sync_until_quiet(pair)
    assert every(pair, lambda db: event_state(db, "m1")) == ("consumed", mine.id, 1)
    assert every(pair, lambda db: len(db.conflicts.list())) == 1
    assert_converged(pair)
    no_violations(pair)


def test_a_stale_run_past_its_mutation_keeps_the_event_until_the_owner_resumes_it(pair):
    """The stale replica already called its tool: its claim wins (a second call is what the
    rules avoid), its run is paused and its mutation set to reconcile; the owner's own run
    stops before doing anything. The owner then reconciles and finishes with a retry run."""
    for replica in pair:
        replica.db.ownership.claim("wf")
        replica.db.events.publish("wf", "inbox", "m1", {})
    owner, stale = sorted(pair, key=lambda r: r.site_id, reverse=True)
    mine, theirs = consumer(owner), consumer(stale)
    reserve(owner, mine, "m1")
    reserve(stale, theirs, "m1")
    mutation = stale.db.execution.begin_mutation(theirs.id, tool_namespace="mail", tool_method="send", params={})

    sync_until_quiet(pair)

    m1 = event_id(topic_id("wf", "inbox"), "m1")
    assert every(pair, lambda db: event_state(db, "m1")) == ("reserved", theirs.id, 1)
    runs = every(pair, lambda db: {r.id: (r.status, r.phase) for r in db.handler_runs.list_by_workflow("wf")})
    assert runs == {mine.id: ("crashed", "prepared"), theirs.id: ("paused:reconciliation", "mutating")}
    assert every(pair, lambda db: db.mutations.get(mutation.id).status) == "needs_reconcile"
    conflicts = every(pair, lambda db: db.conflicts.list())
    assert [(c.kind, c.detail["winner"]) for c in conflicts] == [("double_reservation", theirs.id)]
    assert conflicts[0].subjects == sorted([m1, mine.id, theirs.id])
    no_violations(pair)

    owner.db.execution.apply_mutation(mutation.id, {"found": "sent"})  # reconciliation's answer
    retry = owner.db.execution.create_retry_run(theirs.id)
    owner.db.execution.commit_consumer(retry.id)
    sync_until_quiet(pair)
    assert every(pair, lambda db: event_state(db, "m1")) == ("consumed", retry.id, 1)
    assert_converged(pair)
    no_violations(pair)


def test_two_active_runs_of_one_workflow_keep_the_owners_runs(pair):
    for replica in pair:
        replica.db.ownership.claim("wf")
    owner, stale = sorted(pair, key=lambda r: r.site_id, reverse=True)
    mine = owner.db.execution.start_run(script_run_id="s", workflow_id="wf", handler_type="producer",
                                        handler_name="poller")
    theirs = stale.db.execution.start_run(script_run_id="s", workflow_id="wf", handler_type="producer",
                                          handler_name="poller")
    sync_until_quiet(pair)
    conflicts = every(pair, lambda db: db.conflicts.list())
    assert [(c.kind, c.subjects) for c in conflicts] == [("two_active_runs", sorted([mine.id, theirs.id]))]
    assert conflicts[0].detail["kept_replica"] == owner.site_id
    assert every(pair, lambda db: (db.handler_runs.get(mine.id).status, db.handler_runs.get(theirs.id).status)) == (
        "active", "crashed")
    no_violations(pair)


# -- concurrent writes of one row ------------------------------------------------------------------


def test_concurrent_handler_state_set_has_the_same_value_everywhere(pair):
    a, b = pair
    a.db.handler_state.set("wf", "counter", {"n": 0}, updated_by_run_id="r0")
    sync_until_quiet(pair)
    a.clock.advance(9)
    a.db.handler_state.set("wf", "counter", {"n": 1}, updated_by_run_id="zz-run-on-a")
    b.clock.advance(4)
    b.db.handler_state.set("wf", "counter", {"n": 2}, updated_by_run_id="aa-run-on-b")
    sync_until_quiet(pair)
    row = every(pair, lambda db: db.handler_state.get("wf", "counter"))
    # One write each since the sync: every column takes the greater value on its own, so the
    # state is b's and the bookkeeping columns a's. The state is one value everywhere.
    assert (row.state, row.updated_at, row.updated_by_run_id) == ({"n": 2}, START + 9, "zz-run-on-a")
    assert_converged(pair)


def test_concurrent_releases_count_one_attempt(pair):
    """attempt_number is read-modify-write: each replica adds 1 to the value it has, so two
    releases of the same reservation made concurrently converge to one increment (2, not 3)."""
    a, b = pair
    a.db.ownership.claim("wf")
    a.db.events.publish("wf", "inbox", "m1", {})
    run = consumer(a)
    reserve(a, run, "m1")
    sync_until_quiet(pair)
    a.db.execution.fail_run(run.id, "failed:internal", error="on a")
    b.db.execution.fail_run(run.id, "crashed", error="on b")  # ending a run works on any replica
    assert event_state(a.db, "m1") == event_state(b.db, "m1") == ("pending", "", 2)
    sync_until_quiet(pair)
    assert every(pair, lambda db: event_state(db, "m1")) == ("pending", "", 2)
    # Same version: the greater status wins ('failed:internal' > 'crashed'), written by the owner.
    assert every(pair, lambda db: db.handler_runs.get(run.id).status) == "failed:internal"
    assert every(pair, lambda db: db.conflicts.list()) == []
    no_violations(pair)


def test_a_run_ended_by_a_non_owner_is_recorded_as_a_non_owner_write(pair):
    a, b = pair
    a.db.ownership.claim("wf")
    a.db.events.publish("wf", "inbox", "m1", {})
    run = consumer(a)
    reserve(a, run, "m1")
    sync_until_quiet(pair)
    a.db.execution.fail_run(run.id, "failed:internal")
    b.db.execution.fail_run(run.id, "paused:transient")  # the greater value: b's write wins
    sync_until_quiet(pair)
    conflicts = every(pair, lambda db: db.conflicts.list())
    assert [(c.kind, c.subjects) for c in conflicts] == [("non_owner_write", [run.id])]
    assert conflicts[0].detail == {
        "run": run.id, "created_by": a.site_id, "phase_written_by": a.site_id, "status_written_by": b.site_id,
        "owner": a.site_id, "phase": "prepared", "status": "paused:transient"}
    assert every(pair, lambda db: event_state(db, "m1")) == ("pending", "", 2)
    no_violations(pair)


# -- three replicas ------------------------------------------------------------------------------


def test_three_replicas_relay_partition_and_heal(trio):
    """a - b - c in a line (b relays). a owns the workflow; while c is cut off it takes the
    workflow over and reserves m1 and m2, and a consumes m1 meanwhile."""
    a, b, c = trio
    line = [(0, 1), (1, 2)]
    a.db.ownership.claim("wf")
    for message in ("m1", "m2", "m3"):
        a.db.events.publish("wf", "inbox", message, {})
    sync_until_quiet(trio, line)
    assert every(trio, lambda db: db.ownership.owner("wf")) == a.site_id

    c.db.ownership.claim("wf", force=True)
    theirs = consumer(c)
    reserve(c, theirs, "m1", "m2")
    mine = consumer(a)
    reserve(a, mine, "m1")
    mutation = a.db.execution.begin_mutation(mine.id, tool_namespace="mail", tool_method="send", params={})
    a.db.execution.apply_mutation(mutation.id, {"ok": True})
    a.db.handler_runs.set_phase(mine.id, "emitting")
    a.db.execution.commit_consumer(mine.id)
    b.db.events.publish("wf", "inbox", "m4", {})
    sync_until_quiet(trio, [(0, 1)])  # the {a, b} side of the partition
    assert event_state(b.db, "m1") == ("consumed", mine.id, 1)

    sync_until_quiet(trio, line)  # healed

    assert_converged(trio)
    no_violations(trio)
    assert every(trio, lambda db: db.ownership.owner("wf")) == c.site_id
    m1 = event_id(topic_id("wf", "inbox"), "m1")
    conflicts = every(trio, lambda db: db.conflicts.list())
    assert [(k.kind, k.subjects, k.detail["winner"]) for k in conflicts] == [
        ("double_reservation", sorted([m1, mine.id, theirs.id]), mine.id)]  # consumed stays consumed
    assert every(trio, lambda db: [event_state(db, m) for m in ("m1", "m2", "m3", "m4")]) == [
        ("consumed", mine.id, 1), ("pending", "", 1), ("pending", "", 1), ("pending", "", 1)]
    assert every(trio, lambda db: (db.handler_runs.get(theirs.id).status, db.handler_runs.get(mine.id).status)) == (
        "crashed", "committed")
    won = consumer(c)  # the new owner goes on with what is left
    reserve(c, won, "m2", "m3", "m4")
    sync_until_quiet(trio, line)
    no_violations(trio)
