"""The conflicts store on one replica (detection after merges is in the conflict suite)."""

from __future__ import annotations

import pytest

from engine import InvalidTransitionError, NotFoundError


def test_record_is_idempotent_and_order_of_subjects_does_not_matter(db, clock):
    first, created = db.conflicts.record("double_reservation", "wf", ["run-b", "run-a"], {"event": "e1"})
    assert created
    assert (first.kind, first.workflow_id, first.subjects, first.detail) == (
        "double_reservation", "wf", ["run-a", "run-b"], {"event": "e1"},
    )
    assert (first.status, first.detected_at, first.detected_by) == ("open", clock.now_ms(), db.site_id)
    clock.advance(5)
    again, created = db.conflicts.record("double_reservation", "wf", ["run-a", "run-b"], {"event": "e1"})
    assert not created and again == first


def test_same_conflict_has_the_same_id_on_two_replicas(open_db):
    a, b = open_db("a"), open_db("b")
    assert (
        a.conflicts.record("two_active_runs", "wf", ["r1", "r2"], {})[0].id
        == b.conflicts.record("two_active_runs", "wf", ["r2", "r1"], {})[0].id
    )


def test_list_filters_and_orders(db, clock):
    db.conflicts.record("two_active_runs", "wf1", ["r1", "r2"], {})
    clock.advance(1)
    later, _ = db.conflicts.record("non_owner_write", "wf2", ["r3"], {"column": "phase"})
    assert [c.kind for c in db.conflicts.list()] == ["two_active_runs", "non_owner_write"]
    assert db.conflicts.list(workflow_id="wf2") == [later]
    assert db.conflicts.list(kind="two_active_runs")[0].subjects == ["r1", "r2"]


def test_resolve_closes_once(db, clock):
    conflict, _ = db.conflicts.record("non_owner_write", "wf", ["r1"], {})
    clock.advance(7)
    resolved = db.conflicts.resolve(conflict.id)
    assert (resolved.status, resolved.resolved_at) == ("resolved", clock.now_ms())
    assert db.conflicts.list() == []
    assert db.conflicts.list(status=None) == [resolved]
    with pytest.raises(InvalidTransitionError, match="'resolved' to 'resolved'"):
        db.conflicts.resolve(conflict.id)
    with pytest.raises(NotFoundError):
        db.conflicts.resolve("missing")
    # re-detecting a resolved conflict keeps it resolved
    assert db.conflicts.record("non_owner_write", "wf", ["r1"], {})[0].status == "resolved"


@pytest.mark.parametrize(
    "kind, workflow_id, subjects, message",
    [("bogus", "wf", ["r"], "not one of"), ("two_active_runs", "", ["r"], "workflow_id"), ("two_active_runs", "wf", [], "subject")],
)
def test_bad_input_is_refused(db, kind, workflow_id, subjects, message):
    with pytest.raises(ValueError, match=message):
        db.conflicts.record(kind, workflow_id, subjects, {})
