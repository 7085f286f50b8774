"""HandlerStateStore: upsert keeping wake_at, JSON null vs missing, set_wake_at on a missing
row, due rows by the manual clock, deletes read back, malformed JSON, validation, big and odd
values, deterministic ids."""

from __future__ import annotations

import pytest

from engine import CorruptDataError, NotFoundError
from engine.handler_state import HandlerState, handler_state_id
from engine.rows import deterministic_id

T0 = 1_700_000_000_000


def count(db) -> int:
    return db.connection.execute("SELECT count(*) FROM handler_state").fetchall()[0][0]


def test_set_returns_the_row_and_get_reads_it(db):
    row = db.handler_state.set("wf", "counter", {"n": 1}, updated_by_run_id="run-1")
    assert row == HandlerState(id=deterministic_id("wf", "counter"), workflow_id="wf", handler_name="counter",
                               state={"n": 1}, wake_at=0, updated_at=T0, updated_by_run_id="run-1")
    assert db.handler_state.get("wf", "counter") == row


def test_set_again_replaces_state_and_keeps_wake_at(db, clock):
    db.handler_state.set("wf", "h", {"n": 1}, updated_by_run_id="run-1")
    db.handler_state.set_wake_at("wf", "h", T0 + 60_000)
    clock.advance(500)
    row = db.handler_state.set("wf", "h", [1, 2], updated_by_run_id="run-2")
    assert (row.state, row.wake_at, row.updated_at, row.updated_by_run_id) == ([1, 2], T0 + 60_000, T0 + 500, "run-2")
    assert count(db) == 1


def test_set_with_wake_at_creates_and_schedules_in_one_call(db):
    row = db.handler_state.set("wf", "h", {}, wake_at=T0 + 5)
    assert (row.state, row.wake_at) == ({}, T0 + 5)
    assert db.handler_state.set("wf", "h", {}, wake_at=0).wake_at == 0


def test_json_null_state_is_a_row_while_missing_state_is_none(db):
    assert db.handler_state.get("wf", "h") is None
    row = db.handler_state.set("wf", "h", None)
    assert row.state is None
    stored = db.handler_state.get("wf", "h")
    assert stored is not None and stored.state is None
    assert db.connection.execute("SELECT state FROM handler_state").fetchall() == [("null",)]
    assert db.handler_state.get("wf", "other") is None


def test_falsy_states_round_trip_exactly(db):
    for i, value in enumerate([0, "", [], {}, False, 0.0]):
        db.handler_state.set("wf", f"h{i}", value)
        got = db.handler_state.get("wf", f"h{i}").state
        assert got == value and type(got) is type(value)


def test_set_wake_at_updates_an_existing_row(db, clock):
    db.handler_state.set("wf", "h", {"n": 1}, updated_by_run_id="run-1")
    clock.advance(20)
    row = db.handler_state.set_wake_at("wf", "h", T0 + 1_000)
    assert (row.state, row.wake_at, row.updated_at, row.updated_by_run_id) == ({"n": 1}, T0 + 1_000, T0 + 20, "run-1")
    assert db.handler_state.get("wf", "h") == row
    assert db.handler_state.set_wake_at("wf", "h", 0).wake_at == 0


def test_set_wake_at_on_a_missing_row_is_not_found_and_creates_nothing(db):
    with pytest.raises(NotFoundError) as caught:
        db.handler_state.set_wake_at("wf", "nobody", T0)
    assert (caught.value.table, caught.value.id) == ("handler_state", handler_state_id("wf", "nobody"))
    assert "no state for workflow 'wf', handler 'nobody'" in caught.value.__notes__[0]
    assert db.handler_state.get("wf", "nobody") is None
    assert count(db) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_wake_at_must_be_a_non_negative_int(db, bad):
    db.handler_state.set("wf", "h", 1)
    with pytest.raises(ValueError, match="wake_at"):
        db.handler_state.set_wake_at("wf", "h", bad)
    if bad is not None:  # None is "keep" for set()
        with pytest.raises(ValueError, match="wake_at"):
            db.handler_state.set("wf", "h", 2, wake_at=bad)
    assert (db.handler_state.get("wf", "h").state, db.handler_state.get("wf", "h").wake_at) == (1, 0)


def test_due_lists_scheduled_rows_by_the_manual_clock(db, clock):
    db.handler_state.set("wf", "late", 0, wake_at=T0 + 300)
    db.handler_state.set("wf", "soon", 0, wake_at=T0 + 100)
    db.handler_state.set("wf", "never", 0)
    db.handler_state.set("other", "soon", 0, wake_at=T0 + 100)
    assert db.handler_state.due() == []
    clock.advance(100)
    soon = sorted([handler_state_id("wf", "soon"), handler_state_id("other", "soon")])
    assert [r.id for r in db.handler_state.due()] == soon
    clock.advance(200)
    assert [r.handler_name for r in db.handler_state.due()] == ["soon", "soon", "late"]
    assert len(db.handler_state.due(limit=1)) == 1
    assert db.handler_state.due(now_ms=T0 + 99) == []


def test_list_by_workflow_is_ordered_by_handler_name(db):
    for name in ["zeta", "alpha", "mu"]:
        db.handler_state.set("wf", name, name)
    db.handler_state.set("other", "beta", 0)
    assert [r.handler_name for r in db.handler_state.list_by_workflow("wf")] == ["alpha", "mu", "zeta"]
    assert db.handler_state.list_by_workflow("nobody") == []


def test_delete_counts_and_reads_back(db):
    db.handler_state.set("wf", "a", 1)
    db.handler_state.set("wf", "b", 2)
    assert db.handler_state.delete("wf", "a") == 1
    assert db.handler_state.get("wf", "a") is None
    assert db.handler_state.delete("wf", "a") == 0
    assert [r.handler_name for r in db.handler_state.list_by_workflow("wf")] == ["b"]


def test_delete_by_workflow_counts_and_reads_back(db):
    for name in ["a", "b", "c"]:
        db.handler_state.set("wf", name, name)
    db.handler_state.set("other", "a", 0)
    assert db.handler_state.delete_by_workflow("wf") == 3
    assert db.handler_state.list_by_workflow("wf") == []
    assert [db.handler_state.get("wf", n) for n in "abc"] == [None, None, None]
    assert db.handler_state.get("other", "a").state == 0
    assert db.handler_state.delete_by_workflow("wf") == 0


def test_state_set_after_delete_starts_fresh(db, clock):
    db.handler_state.set("wf", "h", 1, wake_at=T0 + 10)
    db.handler_state.delete("wf", "h")
    clock.advance(1)
    row = db.handler_state.set("wf", "h", 2)
    assert (row.state, row.wake_at, row.updated_at) == (2, 0, T0 + 1)


def test_malformed_state_is_a_corrupt_data_error_naming_table_id_column(db):
    good = db.handler_state.set("wf", "good", 1)
    bad = db.handler_state.set("wf", "bad", 1)
    db.connection.execute("UPDATE handler_state SET state = '{\"open\": ' WHERE id = ?", (bad.id,))
    for read in (lambda: db.handler_state.get("wf", "bad"), lambda: db.handler_state.list_by_workflow("wf")):
        with pytest.raises(CorruptDataError) as caught:
            read()
        assert (caught.value.table, caught.value.id, caught.value.column) == ("handler_state", bad.id, "state")
        assert f"handler_state row {bad.id!r}: column 'state'" in str(caught.value)
    assert db.handler_state.get("wf", "good") == good
    assert db.handler_state.set("wf", "bad", {"fixed": True}).state == {"fixed": True}  # overwriting repairs


def test_unserializable_state_is_a_type_error_and_keeps_the_old_state(db):
    db.handler_state.set("wf", "h", {"n": 1})
    with pytest.raises(TypeError, match="JSON"):
        db.handler_state.set("wf", "h", {"n": object()})
    assert db.handler_state.get("wf", "h").state == {"n": 1}


def test_one_megabyte_state_round_trips(db):
    big = {"blob": "ü" * (1 << 20), "items": [{"i": i} for i in range(2_000)]}
    assert db.handler_state.set("wf", "h", big).state == big
    assert db.handler_state.get("wf", "h").state == big


@pytest.mark.parametrize("call", [
    lambda db: db.handler_state.get("", "h"),
    lambda db: db.handler_state.get("wf", ""),
    lambda db: db.handler_state.set("", "h", 1),
    lambda db: db.handler_state.set("wf", "", 1),
    lambda db: db.handler_state.set_wake_at("", "h", 1),
    lambda db: db.handler_state.set_wake_at("wf", "", 1),
    lambda db: db.handler_state.list_by_workflow(""),
    lambda db: db.handler_state.delete("", "h"),
    lambda db: db.handler_state.delete("wf", ""),
    lambda db: db.handler_state.delete_by_workflow(""),
])
def test_empty_identifiers_are_refused(db, call):
    db.handler_state.set("wf", "h", "kept")
    with pytest.raises(ValueError, match="must not be empty"):
        call(db)
    assert [(r.handler_name, r.state) for r in db.handler_state.list_by_workflow("wf")] == [("h", "kept")]


@pytest.mark.parametrize("name", ["it's", '"q"', "50%", "'; DROP TABLE handler_state; --", "Ünï ✓ 状态", "a_"])
def test_injection_looking_names_are_stored_and_found_verbatim(db, name):
    row = db.handler_state.set(name, name, {name: name}, updated_by_run_id=name)
    assert (row.workflow_id, row.handler_name, row.state, row.updated_by_run_id) == (name, name, {name: name}, name)
    assert db.handler_state.get(name, name) == row
    assert db.handler_state.list_by_workflow(name) == [row]
    assert db.handler_state.list_by_workflow(name + "%") == []
    assert db.handler_state.delete_by_workflow(name + "%") == 0
    assert db.handler_state.delete(name, name) == 1


def test_same_state_row_has_the_same_id_on_two_replicas(open_db):
    a, b = open_db("a"), open_db("b")
    on_a = a.handler_state.set("wf", "h", 1)
    on_b = b.handler_state.set("wf", "h", 2)
    assert on_a.id == on_b.id == handler_state_id("wf", "h") == deterministic_id("wf", "h")
    assert handler_state_id("wf", "h") != handler_state_id("w", "fh")
