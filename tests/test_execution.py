"""The execution model on the real stores: whole lifecycles with exact rows, one transaction
per step (rollback, a failure in the middle, nested savepoints), the mutation boundary,
retry runs and crash recovery."""

from __future__ import annotations

import threading

import pytest
from msgspec.structs import replace

from engine import AlreadyExistsError, InvalidTransitionError, NotFoundError
from engine.execution import FAILURE_STATUSES, UNSET, RecoverySummary
from engine.handler_runs import HandlerRun
from engine.mutations import Mutation

START = 1_700_000_000_000
TABLES = ("topics", "events", "handler_runs", "mutations", "handler_state")


def consumer(db, workflow_id="wf", name="mailer", **kwargs) -> HandlerRun:
    return db.handler_runs.create(script_run_id="s1", workflow_id=workflow_id, handler_type="consumer",
                                  handler_name=name, **kwargs)


def producer(db, workflow_id="wf", name="poller") -> HandlerRun:
    return db.handler_runs.create(script_run_id="s1", workflow_id=workflow_id, handler_type="producer",
                                  handler_name=name)


def publish(db, topic, *message_ids, workflow_id="wf"):
    return [db.events.publish(workflow_id, topic, m, {"m": m}).id for m in message_ids]


def event_states(db, ids):
    """(status, reserved_by_run_id, attempt_number) of each event."""
    return [(e.status, e.reserved_by_run_id, e.attempt_number) for e in (db.events.get(i) for i in ids)]


def prepared(db, run=None, messages=("m1", "m2")) -> tuple[HandlerRun, list[str]]:
    run = run or consumer(db)
    ids = publish(db, "inbox", *messages)
    db.execution.prepare_consumer(run.id, reservations={"inbox": list(messages)}, prepare_result={"plan": 1})
    return db.handler_runs.get(run.id), ids


def mutating(db, run=None, messages=("m1", "m2")) -> tuple[HandlerRun, list[str], Mutation]:
    run, ids = prepared(db, run, messages)
    mutation = db.execution.begin_mutation(run.id, tool_namespace="mail", tool_method="send", params={"to": "x"})
    return db.handler_runs.get(run.id), ids, mutation


def counts(db):
    return {t: db.connection.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}


# -- whole lifecycles ------------------------------------------------------------------------


def test_full_consumer_lifecycle_leaves_exact_rows(db, clock):
    ids = publish(db, "inbox", "m1", "m2") + publish(db, "other", "m3") + publish(db, "inbox", "m4", workflow_id="wf2")
    clock.advance(100)
    run = consumer(db, input_state="in-1")

    clock.advance(10)
    after_prepare = db.execution.prepare_consumer(
        run.id, reservations={"inbox": ["m1", "m2", "m4"], "other": ["m3"]}, prepare_result={"plan": "send"},
        wake_at=START + 9_000)
    record = {"result": {"plan": "send"}, "reservations": {"inbox": ["m1", "m2", "m4"], "other": ["m3"]},
              "reserved_event_ids": ids[:3]}  # m4 belongs to another workflow: not reserved
    assert after_prepare == replace(run, phase="prepared", prepare_result=record)
    assert event_states(db, ids) == [("reserved", run.id, 1)] * 3 + [("pending", "", 1)]
    state = db.handler_state.get("wf", "mailer")
    assert (state.state, state.wake_at, state.updated_by_run_id) == (None, START + 9_000, run.id)

    clock.advance(10)
    mutation = db.execution.begin_mutation(run.id, tool_namespace="mail", tool_method="send",
                                           params={"to": "a@b"}, idempotency_key="k", ui_title="Send")
    assert mutation == Mutation(
        id=mutation.id, handler_run_id=run.id, workflow_id="wf", tool_namespace="mail", tool_method="send",
        params={"to": "a@b"}, idempotency_key="k", status="in_flight", result=None, error="",
        reconcile_attempts=0, last_reconcile_at=0, next_reconcile_at=0, resolved_by="", resolved_at=0,
        ui_title="Send", created_at=START + 120, updated_at=START + 120)
    assert db.handler_runs.get(run.id).phase == "mutating"

    clock.advance(10)
    applied = db.execution.apply_mutation(mutation.id, {"message_id": "x1"})
    assert applied == replace(mutation, status="applied", result={"message_id": "x1"}, updated_at=START + 130)
    assert db.handler_runs.get(run.id) == replace(after_prepare, phase="mutated", mutation_outcome="success")

    clock.advance(10)
    with db.transaction() as tx:
        db.handler_runs.set_phase(run.id, "emitting", tx=tx)
        out = db.events.publish("wf", "sent", "s1", {"ok": True}, created_by_run_id=run.id, caused_by=ids[:2],
                                tx=tx)
    clock.advance(10)
    committed = db.execution.commit_consumer(run.id, state={"count": 2}, output_state="done")
    assert committed == replace(after_prepare, phase="committed", status="committed", mutation_outcome="success",
                                output_state="done", end_timestamp=START + 150)
    assert db.handler_runs.get(run.id) == committed
    assert event_states(db, ids) == [("consumed", run.id, 1)] * 3 + [("pending", "", 1)]
    assert event_states(db, [out.id]) == [("pending", "", 1)]
    state = db.handler_state.get("wf", "mailer")
    assert (state.state, state.wake_at, state.updated_by_run_id, state.updated_at) == (
        {"count": 2}, START + 9_000, run.id, START + 150)


def test_consumer_with_nothing_to_mutate_commits_from_prepared(db, clock):
    run, ids = prepared(db)
    clock.advance(5)
    committed = db.execution.commit_consumer(run.id)
    assert (committed.phase, committed.status, committed.end_timestamp) == ("committed", "committed", START + 5)
    assert event_states(db, ids) == [("consumed", run.id, 1)] * 2
    assert db.handler_state.get("wf", "mailer") is None  # UNSET: no state written
    assert db.mutations.get_by_run(run.id) is None


def test_producer_lifecycle_publishes_and_commits_in_one_transaction(db, clock):
    run = producer(db)
    clock.advance(7)
    with db.transaction() as tx:
        events = [db.events.publish("wf", "inbox", m, {"n": i}, created_by_run_id=run.id, tx=tx)
                  for i, m in enumerate(["a", "b"])]
        committed = db.execution.commit_producer(run.id, state={"cursor": "b"}, output_state="2 new", tx=tx)
    assert committed == replace(run, phase="committed", status="committed", output_state="2 new",
                                end_timestamp=START + 7)
    assert [(e.status, e.created_by_run_id, e.payload) for e in db.events.peek("wf", "inbox")] == [
        ("pending", run.id, {"n": 0}), ("pending", run.id, {"n": 1})]
    assert [e.id for e in events] == [e.id for e in db.events.peek("wf", "inbox")]
    state = db.handler_state.get("wf", "poller")
    assert (state.state, state.updated_by_run_id, state.wake_at) == ({"cursor": "b"}, run.id, 0)


def test_producer_commit_from_executing_and_null_state_is_stored(db):
    run = producer(db)
    db.handler_runs.set_phase(run.id, "executing")
    assert db.execution.commit_producer(run.id, state=None).phase == "committed"
    state = db.handler_state.get("wf", "poller")
    assert state is not None and state.state is None


def test_double_commit_is_refused_and_changes_nothing(db, clock):
    run, ids = prepared(db)
    first = db.execution.commit_consumer(run.id, state={"v": 1})
    clock.advance(50)
    with pytest.raises(InvalidTransitionError) as caught:
        db.execution.commit_consumer(run.id, state={"v": 2})
    assert (caught.value.field, caught.value.from_value, caught.value.to_value) == ("status", "committed", "committed")
    assert db.handler_runs.get(run.id) == first
    assert db.handler_state.get("wf", "mailer").state == {"v": 1}
    p = producer(db)
    db.execution.commit_producer(p.id)
    with pytest.raises(InvalidTransitionError):
        db.execution.commit_producer(p.id)


def test_unset_is_a_single_named_sentinel():
    assert repr(UNSET) == "UNSET" and type(UNSET)() is UNSET


# -- transactions ----------------------------------------------------------------------------


def test_a_rolled_back_multi_store_transaction_leaves_nothing(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            run = db.handler_runs.create(script_run_id="s", workflow_id="wf", handler_type="consumer",
                                         handler_name="h", tx=tx)
            db.events.publish("wf", "inbox", "m1", {}, tx=tx)
            db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result=1,
                                          wake_at=START + 1, tx=tx)
            mutation = db.execution.begin_mutation(run.id, tool_namespace="n", tool_method="m", params={}, tx=tx)
            db.execution.apply_mutation(mutation.id, {}, tx=tx)
            assert counts(db) == {t: 1 for t in TABLES}
            raise RuntimeError("abort")
    assert counts(db) == {t: 0 for t in TABLES}


def test_a_failure_in_the_middle_of_commit_consumer_rolls_the_whole_step_back(db):
    run, ids = prepared(db)
    db.handler_state.set("wf", "mailer", {"v": "before"})
    before_state = db.handler_state.get("wf", "mailer")
    with pytest.raises(TypeError):  # raised by the state write, after the events were consumed
        db.execution.commit_consumer(run.id, state={"bad": object()}, output_state="never")
    assert event_states(db, ids) == [("reserved", run.id, 1)] * 2
    assert db.handler_state.get("wf", "mailer") == before_state
    assert db.handler_runs.get(run.id) == run
    assert db.execution.commit_consumer(run.id, state={"v": "after"}).status == "committed"


def test_nested_savepoints_undo_only_the_failed_step(db):
    run_a = consumer(db, name="a")
    run_b, ids_b = prepared(db, consumer(db, name="b"), messages=("b1",))
    ids_a = publish(db, "inbox", "a1")
    with db.transaction() as tx:
        db.execution.prepare_consumer(run_a.id, reservations={"inbox": ["a1"]}, prepare_result=None, tx=tx)
        with pytest.raises(TypeError):
            db.execution.commit_consumer(run_b.id, state=object(), tx=tx)
        # inside the outer transaction: b's consume was undone, a's reservation stands
        assert event_states(db, ids_b) == [("reserved", run_b.id, 1)]
        assert db.events.reserved_by(run_a.id, tx=tx)[0].id == ids_a[0]
        with db.transaction(tx) as inner:
            db.execution.fail_run(run_b.id, "failed:logic", error="inner", tx=inner)
            with pytest.raises(InvalidTransitionError):
                db.execution.fail_run(run_b.id, "crashed", tx=inner)
    assert db.handler_runs.get(run_a.id).phase == "prepared"
    assert event_states(db, ids_a) == [("reserved", run_a.id, 1)]
    assert db.handler_runs.get(run_b.id).status == "failed:logic"
    assert event_states(db, ids_b) == [("pending", "", 2)]


# -- refusals ---------------------------------------------------------------------------------


def test_prepare_consumer_refusals_reserve_nothing(db):
    ids = publish(db, "inbox", "m1")
    p = producer(db)
    with pytest.raises(ValueError, match="producer run"):
        db.execution.prepare_consumer(p.id, reservations={"inbox": ["m1"]}, prepare_result=None)
    with pytest.raises(NotFoundError):
        db.execution.prepare_consumer("missing", reservations={"inbox": ["m1"]}, prepare_result=None)
    at_emitting = consumer(db, phase="emitting")
    with pytest.raises(InvalidTransitionError, match="'emitting' to 'prepared'"):
        db.execution.prepare_consumer(at_emitting.id, reservations={"inbox": ["m1"]}, prepare_result=None)
    ended = consumer(db)
    db.handler_runs.set_status(ended.id, "paused:transient")
    with pytest.raises(InvalidTransitionError, match="'paused:transient' to 'active'"):
        db.execution.prepare_consumer(ended.id, reservations={"inbox": ["m1"]}, prepare_result=None)
    with pytest.raises(TypeError):
        db.execution.prepare_consumer(consumer(db).id, reservations={"inbox": ["m1"]}, prepare_result=object())
    assert event_states(db, ids) == [("pending", "", 1)]


def test_prepare_consumer_refuses_a_bare_string_of_message_ids(db):
    ids = publish(db, "inbox", "m", "1", "m1")
    run = consumer(db)
    with pytest.raises(ValueError, match=r"reservations\['inbox'\] must be a list of message ids"):
        db.execution.prepare_consumer(run.id, reservations={"inbox": "m1"}, prepare_result=None)
    assert event_states(db, ids) == [("pending", "", 1)] * 3
    assert db.handler_runs.get(run.id).phase == "pending"


def test_prepare_from_preparing_and_a_second_prepare_is_refused(db):
    run = consumer(db, phase="preparing")
    publish(db, "inbox", "m1", "m2")
    assert db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result=0).phase == "prepared"
    with pytest.raises(InvalidTransitionError, match="'prepared' to 'prepared'"):
        db.execution.prepare_consumer(run.id, reservations={"inbox": ["m2"]}, prepare_result=0)
    assert [e.message_id for e in db.events.reserved_by(run.id)] == ["m1"]


def test_events_taken_by_another_run_are_not_reserved_again(db):
    first, ids = prepared(db)
    second = consumer(db, name="other")
    result = db.execution.prepare_consumer(second.id, reservations={"inbox": ["m1", "m2"]}, prepare_result=None)
    assert result.prepare_result["reserved_event_ids"] == []
    assert event_states(db, ids) == [("reserved", first.id, 1)] * 2


@pytest.mark.parametrize("phase", ["pending", "preparing", "mutating", "mutated"])
def test_commit_consumer_refuses_other_phases(db, phase):
    run = consumer(db, phase=phase)
    with pytest.raises(InvalidTransitionError, match=f"'{phase}' to 'committed'"):
        db.execution.commit_consumer(run.id)
    assert db.handler_runs.get(run.id) == run


def test_commit_refuses_the_wrong_handler_type_and_ended_runs(db):
    with pytest.raises(ValueError, match="consumer run"):
        db.execution.commit_producer(consumer(db).id)
    with pytest.raises(ValueError, match="producer run"):
        db.execution.commit_consumer(producer(db).id)
    run, ids = prepared(db)
    db.execution.fail_run(run.id, "failed:internal")
    with pytest.raises(InvalidTransitionError, match="'failed:internal' to 'committed'"):
        db.execution.commit_consumer(run.id)
    with pytest.raises(NotFoundError):
        db.execution.commit_consumer("missing")


def test_begin_mutation_refusals(db):
    with pytest.raises(InvalidTransitionError, match="'pending' to 'mutating'"):
        db.execution.begin_mutation(consumer(db).id, tool_namespace="n", tool_method="m", params={})
    run, _ids, _m = mutating(db)
    with pytest.raises(InvalidTransitionError, match="'mutating' to 'mutating'"):
        db.execution.begin_mutation(run.id, tool_namespace="n", tool_method="m", params={})
    fresh, _ = prepared(db, consumer(db, name="x"), messages=("z",))
    with pytest.raises(ValueError, match="tool_method"):
        db.execution.begin_mutation(fresh.id, tool_namespace="n", tool_method="", params={})
    assert db.handler_runs.get(fresh.id).phase == "prepared"
    assert db.mutations.get_by_run(fresh.id) is None


def test_apply_and_fail_mutation_refusals(db):
    with pytest.raises(NotFoundError):
        db.execution.apply_mutation("missing", {})
    with pytest.raises(NotFoundError):
        db.execution.fail_mutation("missing", "e")
    run, ids, mutation = mutating(db)
    db.execution.apply_mutation(mutation.id, {"r": 1})
    after = db.handler_runs.get(run.id)
    for attempt in (lambda: db.execution.apply_mutation(mutation.id, {"r": 2}),
                    lambda: db.execution.fail_mutation(mutation.id, "late")):
        with pytest.raises(InvalidTransitionError, match="'applied' to"):
            attempt()
    assert db.handler_runs.get(run.id) == after
    assert db.mutations.get(mutation.id).result == {"r": 1}
    assert event_states(db, ids) == [("reserved", run.id, 1)] * 2


def test_fail_run_refuses_committed_active_and_unknown_statuses(db):
    run = consumer(db)
    for status in ("committed", "active", "failed", ""):
        with pytest.raises(ValueError, match="fail_run status"):
            db.execution.fail_run(run.id, status)
    with pytest.raises(NotFoundError):
        db.execution.fail_run("missing", "crashed")
    assert db.handler_runs.get(run.id) == run


# -- the mutation boundary ------------------------------------------------------------------


@pytest.mark.parametrize("status", FAILURE_STATUSES)
def test_fail_run_before_the_boundary_releases_events(db, clock, status):
    run, ids = prepared(db)
    clock.advance(20)
    ended = db.execution.fail_run(run.id, status, error="bad input", error_type="ValueError")
    assert ended == replace(run, status=status, error="bad input", error_type="ValueError",
                            end_timestamp=START + 20)
    assert event_states(db, ids) == [("pending", "", 2)] * 2
    assert db.events.reserved_by(run.id) == []


@pytest.mark.parametrize("stage", ["mutating", "mutated", "emitting"])
def test_fail_run_after_the_boundary_keeps_events_reserved(db, stage):
    if stage == "emitting":
        run, ids = prepared(db)
        db.handler_runs.set_phase(run.id, "emitting")
    else:
        run, ids, mutation = mutating(db)
        if stage == "mutated":
            db.execution.apply_mutation(mutation.id, {})
    ended = db.execution.fail_run(run.id, "failed:internal", error="emit failed")
    assert (ended.phase, ended.status) == (stage, "failed:internal")
    assert event_states(db, ids) == [("reserved", run.id, 1)] * 2


def test_fail_mutation_releases_events_and_records_the_failure(db, clock):
    run, ids, mutation = mutating(db)
    clock.advance(3)
    failed = db.execution.fail_mutation(mutation.id, "550 rejected")
    assert failed == replace(mutation, status="failed", error="550 rejected", updated_at=START + 3)
    assert db.handler_runs.get(run.id) == replace(run, phase="mutated", mutation_outcome="failure")
    assert event_states(db, ids) == [("pending", "", 2)] * 2


def test_a_reconciled_mutation_is_applied_through_the_model(db, clock):
    run, ids, mutation = mutating(db)
    db.mutations.mark_needs_reconcile(mutation.id, next_reconcile_at=START + 10)
    clock.advance(10)
    assert [m.id for m in db.mutations.due_for_reconciliation()] == [mutation.id]
    db.execution.apply_mutation(mutation.id, {"found": True})
    assert db.handler_runs.get(run.id).mutation_outcome == "success"
    assert db.mutations.due_for_reconciliation() == []


# -- retry runs ------------------------------------------------------------------------------


def test_a_retry_run_takes_over_the_reservations_and_finishes_the_work(db, clock):
    run, ids, mutation = mutating(db, consumer(db, input_state="in"))
    db.execution.apply_mutation(mutation.id, {"ok": 1})
    db.handler_runs.set_phase(run.id, "emitting")
    old = db.execution.fail_run(run.id, "paused:transient", error="network")
    clock.advance(30)
    retry = db.execution.create_retry_run(run.id)
    assert retry == HandlerRun(
        id=retry.id, script_run_id="s1", workflow_id="wf", handler_type="consumer", handler_name="mailer",
        phase="emitting", status="active", retry_of=run.id, mutation_outcome="success",
        prepare_result=old.prepare_result, input_state="in", output_state="", start_timestamp=START + 30,
        end_timestamp=0, error="", error_type="", cost=0.0, logs=[])
    assert old.prepare_result == {"result": {"plan": 1}, "reservations": {"inbox": ["m1", "m2"]},
                                  "reserved_event_ids": ids}
    assert event_states(db, ids) == [("reserved", retry.id, 1)] * 2
    assert db.handler_runs.get(run.id) == old
    assert [r.id for r in db.handler_runs.retry_chain(retry.id)] == [run.id, retry.id]
    with pytest.raises(AlreadyExistsError) as caught:
        db.execution.create_retry_run(run.id)
    assert caught.value.id == retry.id
    db.execution.commit_consumer(retry.id, state={"done": True})
    assert event_states(db, ids) == [("consumed", retry.id, 1)] * 2


def test_a_retry_of_a_retry_extends_the_chain(db):
    run, ids = prepared(db)
    db.handler_runs.set_phase(run.id, "emitting")
    db.execution.fail_run(run.id, "crashed")
    second = db.execution.create_retry_run(run.id)
    db.execution.fail_run(second.id, "failed:internal")
    third = db.execution.create_retry_run(second.id)
    assert (third.retry_of, third.prepare_result) == (second.id, run.prepare_result)
    assert run.prepare_result["reserved_event_ids"] == ids
    assert [r.id for r in db.handler_runs.retry_chain(run.id)] == [run.id, second.id, third.id]
    assert event_states(db, ids) == [("reserved", third.id, 1)] * 2


@pytest.mark.parametrize("phase", ["pending", "preparing", "prepared"])
def test_retry_of_a_pre_mutation_run_is_refused(db, phase):
    run = consumer(db, phase=phase)
    db.execution.fail_run(run.id, "failed:logic")
    with pytest.raises(InvalidTransitionError) as caught:
        db.execution.create_retry_run(run.id)
    assert (caught.value.field, caught.value.from_value, caught.value.to_value) == ("phase", phase, "emitting")
    assert db.handler_runs.list_by_session("s1") == [db.handler_runs.get(run.id)]


def test_retry_refuses_active_committed_producer_and_unresolved_mutation(db):
    active = consumer(db, phase="emitting")
    with pytest.raises(InvalidTransitionError, match="'active' to 'active'"):
        db.execution.create_retry_run(active.id)
    done, _ = prepared(db, consumer(db, name="done"), messages=("d1",))
    db.execution.commit_consumer(done.id)
    with pytest.raises(InvalidTransitionError, match="'committed' to 'active'"):
        db.execution.create_retry_run(done.id)
    p = producer(db)
    db.handler_runs.set_phase(p.id, "executing")
    db.execution.fail_run(p.id, "crashed")
    with pytest.raises(InvalidTransitionError, match="'executing' to 'emitting'"):
        db.execution.create_retry_run(p.id)
    run, ids, mutation = mutating(db, consumer(db, name="m"), messages=("x1",))
    db.execution.fail_run(run.id, "failed:internal")
    with pytest.raises(InvalidTransitionError) as caught:
        db.execution.create_retry_run(run.id)
    assert (caught.value.table, caught.value.id, caught.value.from_value) == ("mutations", mutation.id, "in_flight")
    with pytest.raises(NotFoundError):
        db.execution.create_retry_run("missing")
    assert [r.retry_of for r in db.handler_runs.list_by_session("s1")] == [""] * 4  # no retry was created


# -- crash recovery ----------------------------------------------------------------------------


def test_recover_crashed_runs_pauses_in_flight_mutations_and_crashes_the_rest(db, clock):
    a = consumer(db, name="a")  # pending, nothing reserved
    clock.advance(1)
    b, ids_b = prepared(db, consumer(db, name="b"), messages=("b1", "b2"))
    clock.advance(1)
    c, ids_c, _mc = mutating(db, consumer(db, name="c"), messages=("c1", "c2"))
    db.events.publish("wf", "inbox", "c9", {})
    clock.advance(1)
    d, ids_d, md = mutating(db, consumer(db, name="d"), messages=("d1", "d2"))
    db.execution.apply_mutation(md.id, {})
    clock.advance(1)
    e, ids_e = prepared(db, consumer(db, name="e"), messages=("e1",))
    db.handler_runs.set_phase(e.id, "emitting")
    clock.advance(1)
    f, ids_f = prepared(db, consumer(db, name="f"), messages=("f1",))
    db.execution.commit_consumer(f.id)
    clock.advance(1)
    g = producer(db, workflow_id="wf2")
    clock.advance(1)
    h, ids_h, mh = mutating(db, consumer(db, name="h"), messages=("h1", "h2"))
    db.mutations.mark_needs_reconcile(mh.id, next_reconcile_at=START + 99)

    clock.advance(100)
    summary = db.execution.recover_crashed_runs()
    assert summary == RecoverySummary(paused_for_reconciliation=[c.id, h.id], crashed=[a.id, b.id, d.id, e.id, g.id],
                                      events_released=2, events_kept_reserved=2 + 2 + 1 + 2)
    now = START + 107
    assert {r.id: (r.status, r.end_timestamp) for r in db.handler_runs.list_by_session("s1") if r.id != f.id} == {
        a.id: ("crashed", now), b.id: ("crashed", now), c.id: ("paused:reconciliation", now),
        d.id: ("crashed", now), e.id: ("crashed", now), g.id: ("crashed", now),
        h.id: ("paused:reconciliation", now)}
    assert db.handler_runs.get(c.id).error == "recovered after a restart at phase mutating"
    assert event_states(db, ids_b) == [("pending", "", 2)] * 2
    assert event_states(db, ids_c) == [("reserved", c.id, 1)] * 2
    assert event_states(db, ids_d) == [("reserved", d.id, 1)] * 2
    assert event_states(db, ids_e) == [("reserved", e.id, 1)]
    assert event_states(db, ids_f) == [("consumed", f.id, 1)]
    assert db.handler_runs.get(f.id).end_timestamp == START + 5
    assert db.execution.recover_crashed_runs() == RecoverySummary([], [], 0, 0)


def test_recover_one_workflow_only(db):
    a = consumer(db)
    b = consumer(db, workflow_id="wf2")
    assert db.execution.recover_crashed_runs("wf2") == RecoverySummary([], [b.id], 0, 0)
    assert db.handler_runs.get(a.id).status == "active"


def test_a_paused_run_is_resumed_by_a_retry_once_its_mutation_is_known(db):
    run, ids, mutation = mutating(db)
    assert db.execution.recover_crashed_runs().paused_for_reconciliation == [run.id]
    with pytest.raises(InvalidTransitionError):
        db.execution.commit_consumer(run.id)
    db.execution.apply_mutation(mutation.id, {"found": True})
    paused = db.handler_runs.get(run.id)
    assert (paused.status, paused.phase, paused.mutation_outcome) == ("paused:reconciliation", "mutated", "success")
    retry = db.execution.create_retry_run(run.id)
    assert (retry.phase, retry.mutation_outcome, retry.retry_of) == ("emitting", "success", run.id)
    assert event_states(db, ids) == [("reserved", retry.id, 1)] * 2


def test_wake_at_keeps_existing_state(db):
    db.handler_state.set("wf", "mailer", {"n": 5})
    run = consumer(db)
    publish(db, "inbox", "m1")
    db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result=None, wake_at=START + 60)
    state = db.handler_state.get("wf", "mailer")
    assert (state.state, state.wake_at) == ({"n": 5}, START + 60)
    with pytest.raises(ValueError):
        db.execution.prepare_consumer(consumer(db).id, reservations={}, prepare_result=None, wake_at=-1)


def test_eight_threads_preparing_runs_for_the_same_events_split_them_without_overlap(open_db):
    db = open_db("race")
    ids = publish(db, "inbox", *[f"m{i}" for i in range(20)])
    runs = [consumer(db, name=f"h{i}") for i in range(8)]
    handles = [open_db("race") for _ in runs]
    barrier = threading.Barrier(len(runs))
    errors: list[BaseException] = []

    def body(thread_db, run):
        barrier.wait(30)
        try:
            thread_db.execution.prepare_consumer(run.id, reservations={"inbox": [f"m{i}" for i in range(20)]},
                                                 prepare_result=None)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=body, args=pair) for pair in zip(handles, runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    recorded = {r.id: db.handler_runs.get(r.id).prepare_result["reserved_event_ids"] for r in runs}
    assert sorted(len(v) for v in recorded.values()) == [0] * 7 + [20]  # one prepare takes them all
    winner = next(run_id for run_id, taken in recorded.items() if taken)
    assert recorded[winner] == ids
    assert event_states(db, ids) == [("reserved", winner, 1)] * 20
