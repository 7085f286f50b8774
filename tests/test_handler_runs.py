"""HandlerRunStore on the real migrations: phases, statuses, data fields, logs, retry chains,
deletes, errors, and racing writers (threads and processes)."""

from __future__ import annotations

import itertools
import multiprocessing
import threading

import pytest

from engine import CorruptDataError, Database, InvalidTransitionError, ManualClock, NotFoundError
from engine.handler_runs import PHASES, STATUSES, HandlerRun

START = 1_700_000_000_000  # the clock fixture's start

# The contract, written out independently of the implementation.
PRODUCER_EDGES = {("pending", "executing"), ("executing", "committed")}
CONSUMER_EDGES = {
    ("pending", "preparing"), ("preparing", "prepared"), ("prepared", "mutating"), ("prepared", "emitting"),
    ("mutating", "mutated"), ("mutated", "emitting"), ("emitting", "committed"),
}
PRODUCER_PHASES = ["pending", "executing", "committed"]
CONSUMER_PHASES = ["pending", "preparing", "prepared", "mutating", "mutated", "emitting", "committed"]
ALL_PHASES = sorted(set(CONSUMER_PHASES) | set(PRODUCER_PHASES))
FINALS = ["paused:transient", "paused:approval", "paused:reconciliation", "failed:logic", "failed:internal",
          "committed", "crashed"]
ALL_STATUSES = ["active", *FINALS]


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory):
    """One database for the many edge-by-edge tests: each creates its own run, so they do not
    interfere, and skipping a migration per case keeps the suite fast."""
    clock = ManualClock(START)
    with Database.open(tmp_path_factory.mktemp("machines") / "db.db", clock=clock) as db:
        yield db


def illegal(phases, edges):
    return [(a, b) for a in phases for b in ALL_PHASES if (a, b) not in edges]


def new_run(db, handler_type="consumer", **kwargs) -> HandlerRun:
    values = dict(script_run_id="s1", workflow_id="wf", handler_type=handler_type, handler_name="h")
    values.update(kwargs)
    return db.handler_runs.create(**values)


def raw(db, run_id, column):
    return db.connection.execute(f"SELECT {column} FROM handler_runs WHERE id = ?", (run_id,)).fetchall()[0][0]


# -- creating and reading --------------------------------------------------------------


def test_create_returns_the_stored_row_with_exact_values(db, clock):
    run = new_run(db, input_state="in", retry_of="r0")
    assert len(run.id) == 32 and int(run.id, 16) >= 0
    assert run == HandlerRun(
        id=run.id, script_run_id="s1", workflow_id="wf", handler_type="consumer", handler_name="h",
        phase="pending", status="active", retry_of="r0", mutation_outcome="", prepare_result=None,
        input_state="in", output_state="", start_timestamp=START, end_timestamp=0, error="", error_type="",
        cost=0.0, logs=[],
    )
    assert db.handler_runs.get(run.id) == run
    assert raw(db, run.id, "prepare_result") == "" and raw(db, run.id, "logs") == "[]"


def test_create_at_a_later_phase_and_ids_are_unique(db):
    runs = [new_run(db, phase="emitting") for _ in range(3)]
    assert [r.phase for r in runs] == ["emitting"] * 3
    assert len({r.id for r in runs}) == 3
    assert new_run(db, "producer", phase="executing").phase == "executing"


@pytest.mark.parametrize("field", ["script_run_id", "workflow_id", "handler_name"])
def test_create_refuses_empty_identifiers(db, field):
    with pytest.raises(ValueError, match=field):
        new_run(db, **{field: ""})
    assert db.connection.execute("SELECT count(*) FROM handler_runs").fetchall() == [(0,)]


@pytest.mark.parametrize("handler_type, phase", [
    ("worker", "pending"), ("", "pending"), ("producer", "preparing"), ("producer", "mutated"),
    ("consumer", "executing"), ("consumer", "done"),
])
def test_create_refuses_unknown_type_or_foreign_phase(db, handler_type, phase):
    with pytest.raises(ValueError, match=repr(handler_type) if phase == "pending" else repr(phase)):
        new_run(db, handler_type, phase=phase)


def test_get_missing_is_none_and_empty_id_is_refused(db):
    assert db.handler_runs.get("nope") is None
    with pytest.raises(ValueError, match="id"):
        db.handler_runs.get("")


def test_injection_looking_names_are_stored_verbatim(db):
    name = "x'); DROP TABLE handler_runs; -- %_ \u00e9\u6f22"
    run = new_run(db, workflow_id=name, handler_name=name, script_run_id=name)
    assert db.handler_runs.get(run.id).handler_name == name
    assert [r.id for r in db.handler_runs.list_by_workflow(name)] == [run.id]
    assert [r.id for r in db.handler_runs.list_by_session(name)] == [run.id]
    assert db.handler_runs.list_by_workflow("x'%") == []


# -- update and logs ---------------------------------------------------------------------


def test_update_writes_each_data_field_and_reads_it_back(db):
    run = new_run(db)
    updated = db.handler_runs.update(
        run.id, prepare_result={"reserved": ["e1", "e2"], "n": 2}, input_state="i", output_state="o",
        error="boom", error_type="Timeout", cost=1.25, end_timestamp=42, mutation_outcome="success",
    )
    expected = HandlerRun(**{**{f: getattr(run, f) for f in run.__struct_fields__},
                             "prepare_result": {"reserved": ["e1", "e2"], "n": 2}, "input_state": "i",
                             "output_state": "o", "error": "boom", "error_type": "Timeout", "cost": 1.25,
                             "end_timestamp": 42, "mutation_outcome": "success"})
    assert updated == expected
    assert db.handler_runs.get(run.id) == expected
    assert raw(db, run.id, "prepare_result") == '{"reserved":["e1","e2"],"n":2}'


def test_update_prepare_result_none_clears_it_and_scalars_round_trip(db):
    run = new_run(db)
    assert db.handler_runs.update(run.id, prepare_result=[1, "a", None]).prepare_result == [1, "a", None]
    assert db.handler_runs.update(run.id, prepare_result="text").prepare_result == "text"
    assert db.handler_runs.update(run.id, prepare_result=None).prepare_result is None
    assert raw(db, run.id, "prepare_result") == ""
    assert db.handler_runs.update(run.id, cost=3).cost == 3.0


@pytest.mark.parametrize("field", ["phase", "status", "logs", "id", "handler_type", "retry_of",
                                   "start_timestamp", "workflow_id", "bogus"])
def test_update_refuses_non_data_fields_naming_them(db, field):
    run = new_run(db)
    with pytest.raises(ValueError, match=f"'{field}'"):
        db.handler_runs.update(run.id, **{field: "x"})
    assert db.handler_runs.get(run.id) == run


@pytest.mark.parametrize("fields", [{"cost": "1"}, {"end_timestamp": 1.5}, {"error": 3},
                                    {"prepare_result": object()}, {"cost": True}])
def test_update_refuses_wrong_types(db, fields):
    run = new_run(db)
    with pytest.raises(TypeError):
        db.handler_runs.update(run.id, **fields)
    assert db.handler_runs.get(run.id) == run


def test_update_needs_fields_and_an_existing_run(db):
    run = new_run(db)
    with pytest.raises(ValueError, match="at least one field"):
        db.handler_runs.update(run.id)
    with pytest.raises(NotFoundError) as caught:
        db.handler_runs.update("missing", error="x")
    assert (caught.value.table, caught.value.id) == ("handler_runs", "missing")


def test_append_log_keeps_order_and_reads_back(db):
    run = new_run(db)
    db.handler_runs.append_log(run.id, {"msg": "one"})
    db.handler_runs.append_log(run.id, "two")
    last = db.handler_runs.append_log(run.id, [3])
    assert last.logs == [{"msg": "one"}, "two", [3]]
    assert db.handler_runs.get(run.id).logs == [{"msg": "one"}, "two", [3]]
    assert raw(db, run.id, "logs") == '[{"msg":"one"},"two",[3]]'


def test_append_log_errors(db):
    run = new_run(db)
    with pytest.raises(NotFoundError):
        db.handler_runs.append_log("missing", "x")
    with pytest.raises(TypeError):
        db.handler_runs.append_log(run.id, object())
    assert db.handler_runs.get(run.id).logs == []


@pytest.mark.parametrize("column, text", [("logs", "[1, 2"), ("prepare_result", "{not json"),
                                          ("logs", "")])
def test_malformed_json_raises_corrupt_data_naming_table_id_column(db, column, text):
    run = new_run(db)
    other = new_run(db, workflow_id="other")
    with db.transaction() as tx:
        tx.execute(f"UPDATE handler_runs SET {column} = ? WHERE id = ?", (text, run.id))
    for read in (lambda: db.handler_runs.get(run.id), lambda: db.handler_runs.list_by_workflow("wf"),
                 lambda: db.handler_runs.append_log(run.id, "x")):
        with pytest.raises(CorruptDataError) as caught:
            read()
        assert (caught.value.table, caught.value.id, caught.value.column) == ("handler_runs", run.id, column)
    assert db.handler_runs.get(other.id) == other  # the corrupt row does not spoil others


def test_append_log_refuses_a_stored_log_that_is_not_a_list(db):
    run = new_run(db)
    with db.transaction() as tx:
        tx.execute("UPDATE handler_runs SET logs = '{\"a\": 1}' WHERE id = ?", (run.id,))
    with pytest.raises(CorruptDataError, match="expected a JSON list"):
        db.handler_runs.append_log(run.id, "x")
    assert raw(db, run.id, "logs") == '{"a": 1}'


# -- phases --------------------------------------------------------------------------------


def test_phase_machines_match_the_contract():
    assert {(a, b) for a, targets in PHASES["producer"].edges.items() for b in targets} == PRODUCER_EDGES
    assert {(a, b) for a, targets in PHASES["consumer"].edges.items() for b in targets} == CONSUMER_EDGES


@pytest.mark.parametrize("path", [
    ("producer", PRODUCER_PHASES[1:]),
    ("consumer", CONSUMER_PHASES[1:]),
    ("consumer", ["preparing", "prepared", "emitting", "committed"]),
])
def test_legal_phase_walks(db, path):
    handler_type, phases = path
    run = new_run(db, handler_type)
    for phase in phases:
        assert db.handler_runs.set_phase(run.id, phase).phase == phase
    assert db.handler_runs.get(run.id) == HandlerRun(
        **{**{f: getattr(run, f) for f in run.__struct_fields__}, "phase": "committed"}
    )


@pytest.mark.parametrize("handler_type, start, target", [
    *[("producer", a, b) for a, b in illegal(PRODUCER_PHASES, PRODUCER_EDGES)],
    *[("consumer", a, b) for a, b in illegal(CONSUMER_PHASES, CONSUMER_EDGES)],
])
def test_every_illegal_phase_edge_is_refused(shared_db, handler_type, start, target):
    db = shared_db
    run = new_run(db, handler_type, phase=start)
    with pytest.raises(InvalidTransitionError) as caught:
        db.handler_runs.set_phase(run.id, target)
    error = caught.value
    assert (error.table, error.id, error.field, error.from_value, error.to_value) == (
        "handler_runs", run.id, "phase", start, target)
    assert db.handler_runs.get(run.id) == run


def test_set_phase_unknown_phase_missing_id_and_empty_id(db):
    run = new_run(db)
    with pytest.raises(ValueError, match="'done'"):
        db.handler_runs.set_phase(run.id, "done")
    with pytest.raises(NotFoundError):
        db.handler_runs.set_phase("missing", "preparing")
    with pytest.raises(ValueError):
        db.handler_runs.set_phase("", "preparing")
    assert db.handler_runs.get(run.id) == run


# -- statuses ------------------------------------------------------------------------------


def test_status_machine_matches_the_contract():
    assert STATUSES.edges == {"active": frozenset(FINALS)}


@pytest.mark.parametrize("status", FINALS)
def test_each_final_status_from_active_sets_end_timestamp(db, clock, status):
    run = new_run(db)
    clock.advance(250)
    ended = db.handler_runs.set_status(run.id, status, error="why", error_type="Kind")
    assert (ended.status, ended.end_timestamp, ended.error, ended.error_type) == (status, START + 250, "why", "Kind")
    assert db.handler_runs.get(run.id) == ended


def test_set_status_without_error_keeps_a_recorded_error(db):
    run = new_run(db)
    db.handler_runs.update(run.id, error="earlier", error_type="E")
    ended = db.handler_runs.set_status(run.id, "crashed")
    assert (ended.error, ended.error_type) == ("earlier", "E")


@pytest.mark.parametrize("start, target", [
    (a, b) for a, b in itertools.product(ALL_STATUSES, ALL_STATUSES) if not (a == "active" and b != "active")
])
def test_every_illegal_status_edge_is_refused(shared_db, start, target):
    db = shared_db
    run = new_run(db)
    if start != "active":
        run = db.handler_runs.set_status(run.id, start)
    db.clock.advance(10)
    with pytest.raises(InvalidTransitionError) as caught:
        db.handler_runs.set_status(run.id, target, error="late")
    error = caught.value
    assert (error.field, error.from_value, error.to_value) == ("status", start, target)
    assert db.handler_runs.get(run.id) == run


def test_set_status_unknown_status_and_missing_id(db):
    run = new_run(db)
    for bad in ("done", "paused", "failed", ""):
        with pytest.raises(ValueError):
            db.handler_runs.set_status(run.id, bad)
    with pytest.raises(NotFoundError):
        db.handler_runs.set_status("missing", "crashed")
    assert db.handler_runs.get(run.id) == run


# -- listing -------------------------------------------------------------------------------


def test_listing_order_and_filters_with_a_manual_clock(db, clock):
    ids = []
    for session, workflow in [("s1", "wf"), ("s2", "wf"), ("s1", "wf2"), ("s1", "wf")]:
        ids.append(new_run(db, script_run_id=session, workflow_id=workflow).id)
        clock.advance(5)
    a, b, c, d = ids
    assert [r.id for r in db.handler_runs.list_by_session("s1")] == [a, c, d]
    assert [r.id for r in db.handler_runs.list_by_workflow("wf")] == [d, b, a]
    assert [r.id for r in db.handler_runs.list_by_workflow("wf", limit=2)] == [d, b]
    assert db.handler_runs.list_by_workflow("wf", limit=0) == []
    with pytest.raises(ValueError):
        db.handler_runs.list_by_workflow("wf", limit=-1)
    db.handler_runs.set_status(b, "committed")
    assert [r.id for r in db.handler_runs.incomplete()] == [a, c, d]
    assert [r.id for r in db.handler_runs.incomplete("wf")] == [a, d]
    assert db.handler_runs.has_active_run("wf") is True
    for run_id in (a, d):
        db.handler_runs.set_status(run_id, "failed:logic")
    assert db.handler_runs.has_active_run("wf") is False
    assert db.handler_runs.has_active_run("wf2") is True
    assert db.handler_runs.has_active_run("unknown") is False


def test_same_timestamp_ties_break_by_id(db):
    runs = [new_run(db) for _ in range(5)]
    assert [r.id for r in db.handler_runs.list_by_session("s1")] == sorted(r.id for r in runs)
    assert [r.id for r in db.handler_runs.list_by_workflow("wf")] == sorted((r.id for r in runs), reverse=True)


@pytest.mark.parametrize("call", [
    lambda s: s.list_by_session(""), lambda s: s.list_by_workflow(""), lambda s: s.incomplete(""),
    lambda s: s.has_active_run(""), lambda s: s.retry_chain(""), lambda s: s.delete_by_session(""),
    lambda s: s.delete_by_workflow(""), lambda s: s.append_log("", 1), lambda s: s.set_status("", "crashed"),
    lambda s: s.update("", error="x"),
])
def test_empty_identifiers_are_refused_everywhere(db, call):
    with pytest.raises(ValueError):
        call(db.handler_runs)


# -- retry chains --------------------------------------------------------------------------


def test_retry_chain_linear_from_any_member(db, clock):
    a = new_run(db)
    clock.advance(1)
    b = new_run(db, retry_of=a.id)
    clock.advance(1)
    c = new_run(db, retry_of=b.id)
    new_run(db)  # unrelated
    for member in (a, b, c):
        assert [r.id for r in db.handler_runs.retry_chain(member.id)] == [a.id, b.id, c.id]


def test_retry_chain_branches_breadth_first_and_survives_gaps_and_cycles(db, clock):
    a = new_run(db)
    clock.advance(1)
    b2 = new_run(db, retry_of=a.id)
    clock.advance(1)
    b1 = new_run(db, retry_of=a.id)
    clock.advance(1)
    c = new_run(db, retry_of=b2.id)
    assert [r.id for r in db.handler_runs.retry_chain(c.id)] == [a.id, b2.id, b1.id, c.id]
    orphan = new_run(db, retry_of="deleted-run")
    assert [r.id for r in db.handler_runs.retry_chain(orphan.id)] == [orphan.id]
    with db.transaction() as tx:  # a cycle can only come from corrupt or hand-edited data
        tx.execute("UPDATE handler_runs SET retry_of = ? WHERE id = ?", (c.id, a.id))
    assert sorted(r.id for r in db.handler_runs.retry_chain(b1.id)) == sorted([a.id, b2.id, b1.id, c.id])
    with pytest.raises(NotFoundError):
        db.handler_runs.retry_chain("missing")


# -- deletes -------------------------------------------------------------------------------


def test_deletes_return_counts_and_are_verified_by_reading_back(db):
    a = new_run(db, script_run_id="s1", workflow_id="wf")
    b = new_run(db, script_run_id="s1", workflow_id="wf2")
    c = new_run(db, script_run_id="s2", workflow_id="wf")
    d = new_run(db, script_run_id="s3", workflow_id="wf3")
    assert db.handler_runs.delete_by_session("s1") == 2
    assert db.handler_runs.get(a.id) is None and db.handler_runs.get(b.id) is None
    assert db.handler_runs.list_by_session("s1") == []
    assert db.handler_runs.delete_by_session("s1") == 0
    assert db.handler_runs.delete_by_workflow("wf") == 1
    assert db.handler_runs.get(c.id) is None
    assert db.handler_runs.delete_by_workflow("nothing") == 0
    assert db.handler_runs.get(d.id) == d
    assert db.connection.execute("SELECT id FROM handler_runs").fetchall() == [(d.id,)]


# -- transactions --------------------------------------------------------------------------


def test_writes_inside_a_rolled_back_transaction_leave_nothing(db):
    kept = new_run(db)
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            new_run_id = db.handler_runs.create(script_run_id="s9", workflow_id="wf", handler_type="producer",
                                                handler_name="h", tx=tx).id
            db.handler_runs.set_phase(kept.id, "preparing", tx=tx)
            assert db.handler_runs.get(new_run_id, tx=tx).phase == "pending"
            raise RuntimeError("abort")
    assert db.handler_runs.get(new_run_id) is None
    assert db.handler_runs.get(kept.id) == kept


def test_a_failed_step_inside_a_transaction_rolls_back_only_its_savepoint(db):
    run = new_run(db)
    with db.transaction() as tx:
        db.handler_runs.set_phase(run.id, "preparing", tx=tx)
        with pytest.raises(InvalidTransitionError):
            db.handler_runs.set_phase(run.id, "mutating", tx=tx)
        db.handler_runs.append_log(run.id, "still here", tx=tx)
    stored = db.handler_runs.get(run.id)
    assert (stored.phase, stored.logs) == ("preparing", ["still here"])


# -- racing writers ------------------------------------------------------------------------


def _race_set_phase(path: str, run_id: str, go, results) -> None:
    """Process body: open the file, wait for the start signal, try the step once."""
    with Database.open(path) as db:
        results.put("ready")
        go.wait(30)
        results.put(_attempt(db, run_id))


def _attempt(db: Database, run_id: str) -> str:
    try:
        db.handler_runs.set_phase(run_id, "preparing")
        return "won"
    except InvalidTransitionError as error:
        return f"lost {error.from_value}->{error.to_value}"
    except Exception as error:  # reported, and the test fails on it
        return f"error {error!r}"


def test_eight_threads_and_two_processes_race_one_phase_step_exactly_one_wins(open_db, tmp_path):
    db = open_db("race")
    run = new_run(db)
    context = multiprocessing.get_context("spawn")
    go, results = context.Event(), context.Queue()
    processes = [context.Process(target=_race_set_phase, args=(db.path, run.id, go, results)) for _ in range(2)]
    for process in processes:
        process.start()
    try:
        assert [results.get(timeout=60) for _ in processes] == ["ready", "ready"]
        thread_dbs = [open_db("race") for _ in range(8)]
        outcomes: list[str] = []
        lock = threading.Lock()

        def thread_body(thread_db):
            go.wait(30)
            outcome = _attempt(thread_db, run.id)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=thread_body, args=(d,)) for d in thread_dbs]
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join(60)
        outcomes += [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(60)
    assert sorted(outcomes) == ["lost preparing->preparing"] * 9 + ["won"]
    assert [p.exitcode for p in processes] == [0, 0]
    assert db.handler_runs.get(run.id).phase == "preparing"
