"""The pieces of replicated execution one by one: ownership in the execution model, the
invariant checker (each rule made to fire), the clock lookups the audit relies on, the audit's
entry points and repairs, and the status summary."""

from __future__ import annotations

import pytest
from sync.testing import rows
from test_replication_support import assert_converged, close_all, open_replicas, sync_until_quiet

from engine import NotOwnerError
from engine import claims
from engine.events import event_id
from engine.invariants import RULES, Violation
from engine.replication import audit, audit_all, open_conflicts_summary
from engine.topics import topic_id
from sync import export_changes, import_changes

OTHER = "f" * 32
M1 = event_id(topic_id("wf", "inbox"), "m1")


@pytest.fixture
def pair(tmp_path):
    replicas = open_replicas(tmp_path, 2)
    yield replicas
    close_all(replicas)


def hand_over(db, workflow_id="wf", owner=OTHER):
    """Make another replica the owner, as a merged claim would."""
    with db.transaction() as tx:
        tx.execute("INSERT INTO ownership (workflow_id, claim) VALUES (?, ?) ON CONFLICT DO UPDATE SET claim = excluded.claim",
                   (workflow_id, f'{{"owner":"{owner}","claimed_at":1}}'))


def consumer(db, wf="wf"):
    return db.execution.start_run(script_run_id="s", workflow_id=wf, handler_type="consumer", handler_name="h")


def prepared(db, *messages, wf="wf"):
    for message in messages:
        db.events.publish(wf, "inbox", message, {})
    run = consumer(db, wf)
    return db.execution.prepare_consumer(run.id, reservations={"inbox": list(messages)}, prepare_result={"x": 1})


# -- ownership in the execution model --------------------------------------------------------------


def test_the_first_step_claims_an_unowned_workflow(db):
    run = consumer(db)
    assert db.ownership.owner("wf") == db.site_id
    assert db.handler_runs.get(run.id).status == "active"


def test_steps_that_reserve_or_advance_are_refused_on_a_non_owner(db):
    pending = consumer(db)
    ready = prepared(db, "m1")
    producer = db.execution.start_run(script_run_id="s", workflow_id="wf", handler_type="producer", handler_name="p")
    paused = prepared(db, "m2")
    mutation = db.execution.begin_mutation(paused.id, tool_namespace="t", tool_method="m", params={})
    db.execution.apply_mutation(mutation.id, {})
    db.execution.fail_run(paused.id, "paused:transient")
    hand_over(db)
    before = rows(db)
    steps = [
        lambda: consumer(db),
        lambda: db.execution.prepare_consumer(pending.id, reservations={"inbox": ["m1"]}, prepare_result=None),
        lambda: db.execution.begin_mutation(ready.id, tool_namespace="t", tool_method="m", params={}),
        lambda: db.execution.commit_consumer(ready.id),
        lambda: db.execution.commit_producer(producer.id),
        lambda: db.execution.create_retry_run(paused.id),
        lambda: db.execution.recover_crashed_runs("wf"),
    ]
    for step in steps:
        with pytest.raises(NotOwnerError, match=f"owned by replica {OTHER}"):
            step()
    assert rows(db) == before  # each refusal rolled its whole step back
    assert db.execution.recover_crashed_runs().crashed == []  # another replica's runs may be alive
    db.events.publish("wf", "inbox", "m9", {})  # publishing and reading work everywhere
    assert db.events.count_pending("wf", "inbox") == 1


def test_ending_a_run_and_recording_a_tool_call_work_on_a_non_owner(db):
    run = prepared(db, "m1")
    mutation = db.execution.begin_mutation(run.id, tool_namespace="t", tool_method="m", params={})
    other = prepared(db, "m2")
    hand_over(db)
    assert db.execution.apply_mutation(mutation.id, {"ok": 1}).status == "applied"
    assert db.execution.fail_run(other.id, "failed:logic").status == "failed:logic"
    assert db.events.get(event_id(topic_id("wf", "inbox"), "m2")).status == "pending"


def test_a_retry_run_records_only_the_events_handed_over(db):
    run = prepared(db, "m1", "m2")
    mutation = db.execution.begin_mutation(run.id, tool_namespace="t", tool_method="m", params={})
    db.execution.apply_mutation(mutation.id, {})
    db.execution.fail_run(run.id, "crashed")
    m2 = event_id(topic_id("wf", "inbox"), "m2")
    with db.transaction() as tx:  # m2 went to another run in a conflict (as the audit would leave it)
        tx.execute("UPDATE events SET reserved_by_run_id = 'winner' WHERE id = ?", (m2,))
    retry = db.execution.create_retry_run(run.id)
    assert retry.prepare_result == {**run.prepare_result, "reserved_event_ids": [M1]}


# -- the invariant checker -------------------------------------------------------------------------


def sql(db, statement, params=()):
    with db.transaction() as tx:
        tx.execute(statement, params)


def test_a_healthy_replica_has_no_violations(db):
    prepared(db, "m1")
    done = prepared(db, "m2")
    db.execution.commit_consumer(done.id)
    failed = prepared(db, "m3")
    db.execution.fail_run(failed.id, "crashed")
    assert db.execution.check_invariants() == []


def test_each_rule_fires_and_names_the_row(db):
    held = prepared(db, "m1")
    done = prepared(db, "m2")
    db.execution.commit_consumer(done.id)
    m2 = event_id(topic_id("wf", "inbox"), "m2")
    db.events.publish("wf", "other", "o1", {})
    o1 = event_id(topic_id("wf", "other"), "o1")
    db.events.publish("wf", "inbox", "m3", {})
    m3 = event_id(topic_id("wf", "inbox"), "m3")
    db.events.publish("wf", "inbox", "m4", {})
    m4 = event_id(topic_id("wf", "inbox"), "m4")
    odd = consumer(db)
    ended = consumer(db)
    sql(db, "DELETE FROM topics WHERE id = ?", (topic_id("wf", "other"),))
    sql(db, "UPDATE events SET status = 'reserved', reserved_by_run_id = 'gone' WHERE id = ?", (m3,))
    sql(db, "UPDATE events SET reserved_by_run_id = ? WHERE id = ?", (held.id, m4))
    sql(db, "UPDATE events SET status = 'reserved' WHERE id = ?", (m2,))
    sql(db, "UPDATE handler_runs SET status = 'crashed' WHERE id = ?", (ended.id,))
    sql(db, "UPDATE handler_runs SET status = 'active' WHERE id = ?", (ended.id,))
    sql(db, "UPDATE handler_runs SET phase = 'committed' WHERE id = ?", (held.id,))
    sql(db, "UPDATE handler_runs SET status = 'zombie' WHERE id = ?", (odd.id,))
    sql(db, "INSERT INTO mutations (id, handler_run_id) VALUES ('extra', ?)", (done.id,))
    found = {(v.rule, v.id) for v in db.execution.check_invariants()}
    assert found == {
        ("event_without_topic", o1),
        ("reservation_without_run", m3),
        ("pending_with_run", m4),
        ("committed_event_not_consumed", m2),
        ("two_mutations_for_run", "extra"),
        ("phase_status_mismatch", held.id),
        ("terminal_status_reopened", ended.id),
        ("unknown_status", odd.id),
    }
    assert {rule for rule, _ in found} <= set(RULES)


def test_a_double_reservation_without_a_conflict_row_is_reported_and_audited(db, clock):
    first = prepared(db, "m1")
    clock.advance(1)
    second = consumer(db)  # claims m1 too, as a merged run from another replica would
    sql(db, "UPDATE handler_runs SET phase = 'prepared', prepare_result = ? WHERE id = ?",
        (f'{{"reserved_event_ids":["{M1}"]}}', second.id))
    assert db.execution.check_invariants() == [Violation(
        "unrecorded_double_reservation", "events", M1, f"run {second.id} lost it to run {first.id}, no conflict recorded")]
    report = audit_all(db)
    assert (report.stopped, len(report.conflicts)) == ([second.id], 1)
    assert db.execution.check_invariants() == []
    assert (db.events.get(M1).reserved_by_run_id, db.handler_runs.get(second.id).status) == (first.id, "crashed")


def test_corrupt_json_is_never_raised(db):
    run = prepared(db, "m1")
    sql(db, "UPDATE handler_runs SET prepare_result = '{broken', logs = 'also broken' WHERE id = ?", (run.id,))
    sql(db, "INSERT INTO conflicts (id, kind, subjects) VALUES ('c', 'double_reservation', 'nope')")
    assert [v.rule for v in db.execution.check_invariants()] == []  # held by an active run: fine
    assert audit_all(db).repaired_events == []


# -- clock lookups -----------------------------------------------------------------------------------


def test_column_writers_agree_with_crsql_changes_and_keep_the_origin_through_a_relay(tmp_path):
    a, b, c = replicas = open_replicas(tmp_path, 3)
    try:
        run = prepared(a.db, "m1")
        sync_until_quiet(replicas, [(0, 1)])
        b.db.handler_runs.append_log(run.id, "from b")
        sync_until_quiet(replicas, [(0, 1), (1, 2)])
        with c.db.reading() as s:
            found = claims.column_writers(s, "handler_runs", [run.id], ["script_run_id", "phase", "logs"])
            direct = dict(s.execute(
                "SELECT cid, lower(hex(site_id)) FROM crsql_changes WHERE \"table\" = 'handler_runs'"
                " AND cid IN ('script_run_id', 'phase', 'logs')"))
            assert claims.creators(s, [run.id]) == {run.id: a.site_id}
        assert found == {(run.id, "script_run_id"): a.site_id, (run.id, "phase"): a.site_id,
                         (run.id, "logs"): b.site_id}
        assert {col: site for (_id, col), site in found.items()} == direct
        with pytest.raises(ValueError, match="no clock lookup"):
            claims.column_writers(c.db._session, "sqlite_master; --", [run.id], ["x"])
    finally:
        close_all(replicas)


# -- the audit's entry points -----------------------------------------------------------------------


def test_the_audit_is_on_by_default_and_can_be_turned_off(tmp_path):
    from engine import Database
    from engine.replication import _audit_merge, enable_audit

    with Database.open(tmp_path / "on.db") as on, Database.open(tmp_path / "off.db", audit=False) as off:
        assert on.merge_listeners == [_audit_merge]
        assert off.merge_listeners == []
        remove = enable_audit(off)
        assert off.merge_listeners == [_audit_merge]
        remove()
        assert off.merge_listeners == []


def test_a_schema_without_the_execution_stores_gets_no_audit(tmp_path):
    from pathlib import Path

    from engine import Database

    notes = Path(__file__).resolve().parent.parent / "examples" / "notes_app" / "migrations"
    with Database.open(tmp_path / "notes.db", migrations=notes) as db:
        assert db.merge_listeners == []


def test_audit_ignores_other_tables_and_a_clean_state(db):
    prepared(db, "m1")
    assert not audit(db, [("handler_state", ("x",)), ("__sync_peers", ("y",)), ("events", ())])
    assert not audit_all(db)


def test_a_commit_racing_a_stop_ends_committed(pair, tmp_path):
    """b's run loses to a's on one side (a stops it) while b commits it on the other: the
    merged row says phase committed, status crashed. The commit happened: committed wins."""
    a, b = pair
    for replica in pair:
        replica.db.ownership.claim("wf")
        replica.db.events.publish("wf", "inbox", "m1", {})
    owner, stale = sorted(pair, key=lambda r: r.site_id, reverse=True)
    mine = prepared(owner.db, "m1")
    theirs = prepared(stale.db, "m1")
    export_changes(stale.db, tmp_path / "to-owner.bin", for_site=owner.site_id)
    import_changes(owner.db, tmp_path / "to-owner.bin")  # one way: the owner stops the stale run
    assert owner.db.handler_runs.get(theirs.id).status == "crashed"
    stale.db.execution.commit_consumer(theirs.id)  # meanwhile, offline, the stale replica commits
    sync_until_quiet(pair)
    assert_converged(pair)
    run = stale.db.handler_runs.get(theirs.id)
    assert (run.phase, run.status, run.error_type) == ("committed", "committed", "conflict")
    # Its consumption stands (committed first); the owner's own run lost the event.
    assert stale.db.events.get(M1).reserved_by_run_id == theirs.id
    assert (stale.db.events.get(M1).status, stale.db.handler_runs.get(mine.id).status) == ("consumed", "crashed")
    for replica in pair:
        assert replica.db.execution.check_invariants() == []


def test_a_resolved_conflict_stays_resolved_and_the_summary_lists_open_ones(pair):
    a, b = pair
    for replica in pair:
        replica.db.ownership.claim("wf")
        prepared(replica.db, "m1")
    sync_until_quiet(pair)
    conflict = a.db.conflicts.list()[0]
    lines = open_conflicts_summary(b.db)
    assert lines[0] == "open conflicts: 1"
    assert lines[1].startswith(f"  {conflict.id}  double_reservation  workflow wf: ")
    assert "UTC by " in lines[1]
    a.db.conflicts.resolve(conflict.id)
    sync_until_quiet(pair)
    assert not audit_all(b.db)  # re-auditing finds the same conflict: the row keeps its status
    assert open_conflicts_summary(b.db) == ["open conflicts: 0"]
    assert b.db.conflicts.get(conflict.id).status == "resolved"


def test_topic_names_are_recorded_for_local_and_merged_topics(pair):
    a, b = pair
    a.db.topics.get_or_create("wf", "inbox")
    b.clock.advance(1)
    b.db.events.publish("wf", "outbox", "x", {})
    sync_until_quiet(pair)
    for replica in pair:
        with replica.db.reading() as s:
            assert s.execute("SELECT id, workflow_id, name FROM __engine_topic_names ORDER BY name") == [
                (topic_id("wf", "inbox"), "wf", "inbox"), (topic_id("wf", "outbox"), "wf", "outbox")]


def test_an_audit_error_keeps_the_merge(pair, caplog, monkeypatch):
    from engine import replication
    from engine.errors import CorruptDataError

    def broken(*args, **kwargs):
        raise CorruptDataError("handler_runs", "x", "logs", "boom")

    monkeypatch.setattr(replication._Audit, "run", broken)
    a, b = pair
    a.db.events.publish("wf", "inbox", "m1", {})
    sync_until_quiet(pair)
    assert b.db.events.count_pending("wf", "inbox") == 1
    assert "after-merge audit" in caplog.text


def test_installing_the_audit_does_not_keep_a_closed_database_alive(tmp_path):
    import gc
    import weakref

    from engine import Database

    db = Database.open(tmp_path / "leak.db")  # the audit is registered
    ref = weakref.ref(db)
    db.close()
    del db
    gc.collect()
    assert ref() is None, "the merge listener holds the database"
