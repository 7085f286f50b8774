"""Workflow ownership on one replica (the multi-replica behaviour is in the conflict suite)."""

from __future__ import annotations

import pytest

from engine import NotOwnerError


def test_unowned_workflow_has_no_owner(db):
    assert db.ownership.owner("wf") is None
    assert db.ownership.get("wf") is None
    assert not db.ownership.is_local_owner("wf")


def test_claim_records_owner_and_time_in_one_column(db, clock):
    assert db.ownership.claim("wf") == db.site_id
    row = db.ownership.get("wf")
    assert row.claim == {"owner": db.site_id, "claimed_at": clock.now_ms()}
    assert db.ownership.is_local_owner("wf")


def test_claiming_again_is_a_no_op(db, clock):
    db.ownership.claim("wf")
    version = db.db_version
    clock.advance(10)
    assert db.ownership.claim("wf") == db.site_id
    assert db.db_version == version
    assert db.ownership.get("wf").claim["claimed_at"] == clock.now_ms() - 10


def test_release_then_claim_again(db):
    db.ownership.claim("wf")
    assert db.ownership.release("wf") == 1
    assert db.ownership.owner("wf") is None
    assert db.ownership.release("wf") == 0
    db.ownership.claim("wf")
    assert db.ownership.is_local_owner("wf")


def test_another_replicas_workflow_cannot_be_claimed_or_released(db):
    other = "f" * 32
    db.connection.execute(
        "INSERT INTO ownership (workflow_id, claim) VALUES ('wf', ?)", (f'{{"owner":"{other}","claimed_at":1}}',)
    )
    with pytest.raises(NotOwnerError, match=f"owned by replica {other}") as info:
        db.ownership.claim("wf")
    assert (info.value.workflow_id, info.value.owner, info.value.local) == ("wf", other, db.site_id)
    with pytest.raises(NotOwnerError):
        db.ownership.release("wf")
    with pytest.raises(NotOwnerError):
        db.ownership.require_local("wf")
    assert db.ownership.claim("wf", force=True) == db.site_id
    assert db.ownership.is_local_owner("wf")


def test_require_local_claims_an_unowned_workflow(db):
    db.ownership.require_local("wf")
    assert db.ownership.owner("wf") == db.site_id


def test_claim_inside_a_rolled_back_transaction_leaves_nothing(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            db.ownership.claim("wf", tx=tx)
            raise RuntimeError
    assert db.ownership.owner("wf") is None


def test_empty_workflow_id_is_refused(db):
    with pytest.raises(ValueError, match="workflow_id must not be empty"):
        db.ownership.claim("")


def test_list_is_ordered_by_workflow(db):
    for wf in ("b", "a", "c"):
        db.ownership.claim(wf)
    assert [o.workflow_id for o in db.ownership.list()] == ["a", "b", "c"]
