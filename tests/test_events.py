"""EventStore: publish/upsert, ordering with a manual clock, reservations and their counts,
pending counts, deletes read back, malformed JSON, validation, big payloads, odd names,
deterministic ids; plus transactions spanning topics, events and handler state."""

from __future__ import annotations

import pytest

from engine import CorruptDataError, EngineError
from engine.events import CONSUMED, PENDING, RESERVED, SKIPPED, Event, event_id
from engine.rows import deterministic_id
from engine.topics import topic_id

T0 = 1_700_000_000_000
ODD = ["it's", 'q"uote', "100%", "'; DROP TABLE events; --", "Ünïcödé ✓ 事件", "a_b"]


def eid(workflow_id: str, topic: str, message_id: str) -> str:
    return event_id(topic_id(workflow_id, topic), message_id)


def count(db, table: str) -> int:
    return db.connection.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def statuses(db, workflow_id: str, topic: str) -> dict[str, tuple[str, str, int]]:
    """message id -> (status, reserved_by_run_id, attempt_number) of every event of a topic."""
    return {e.message_id: (e.status, e.reserved_by_run_id, e.attempt_number)
            for e in db.events.peek(workflow_id, topic, status=None, limit=None)}


@pytest.fixture
def five(db, clock):
    """Five pending events m0..m4 on wf/inbox, published 1 ms apart."""
    for i in range(5):
        db.events.publish("wf", "inbox", f"m{i}", {"n": i})
        clock.advance(1)
    return [eid("wf", "inbox", f"m{i}") for i in range(5)]


# -- publishing ------------------------------------------------------------------------------


def test_publish_returns_the_row_and_creates_the_topic(db):
    event = db.events.publish("wf", "inbox", "m1", {"text": "hello"}, created_by_run_id="run-0",
                              caused_by=["e-x", "e-y"], title="Hello")
    tid = deterministic_id("wf", "inbox")
    assert event == Event(
        id=deterministic_id(tid, "m1"), topic_id=tid, workflow_id="wf", message_id="m1", title="Hello",
        payload={"text": "hello"}, status=PENDING, reserved_by_run_id="", created_by_run_id="run-0",
        attempt_number=1, caused_by=["e-x", "e-y"], created_at=T0, updated_at=T0)
    assert db.events.get(event.id) == event
    assert db.events.get_by_message_id(tid, "m1") == event
    topic = db.topics.get_by_name("wf", "inbox")
    assert (topic.id, topic.created_at) == (tid, T0)


def test_publishing_many_events_keeps_one_topic(db):
    for i in range(3):
        db.events.publish("wf", "inbox", f"m{i}", i)
    assert count(db, "topics") == 1
    assert db.events.count_pending("wf", "inbox") == 3


def test_republish_updates_payload_and_caused_by_but_never_status(db, clock):
    first = db.events.publish("wf", "inbox", "m1", {"v": 1}, created_by_run_id="run-a", caused_by=["c1"])
    clock.advance(10)
    assert db.events.reserve("run-r", "wf", {"inbox": ["m1"]}) == [first.id]
    clock.advance(10)
    again = db.events.publish("wf", "inbox", "m1", {"v": 2}, created_by_run_id="run-b", caused_by=["c2", "c3"])
    assert again.payload == {"v": 2}
    assert again.caused_by == ["c2", "c3"]
    assert again.updated_at == T0 + 20
    # What a re-publish never touches:
    assert (again.status, again.reserved_by_run_id, again.attempt_number) == (RESERVED, "run-r", 1)
    assert (again.created_by_run_id, again.created_at, again.id) == ("run-a", T0, first.id)
    assert db.events.get(first.id) == again
    assert count(db, "events") == 1


def test_republish_of_a_consumed_event_stays_consumed(db):
    db.events.publish("wf", "inbox", "m1", 1)
    db.events.reserve("run", "wf", {"inbox": ["m1"]})
    assert db.events.consume("run") == 1
    again = db.events.publish("wf", "inbox", "m1", 2)
    assert (again.status, again.payload) == (CONSUMED, 2)
    assert db.events.count_pending("wf", "inbox") == 0


def test_caused_by_duplicates_are_dropped_in_order(db):
    event = db.events.publish("wf", "inbox", "m1", None, caused_by=("b", "a", "b"))
    assert event.caused_by == ["b", "a"]
    assert event.payload is None


def test_unserializable_payload_is_a_type_error_and_writes_nothing(db):
    with pytest.raises(TypeError, match="JSON"):
        db.events.publish("wf", "inbox", "m1", {"x": object()})
    assert (count(db, "events"), count(db, "topics")) == (0, 0)


def test_one_megabyte_payload_round_trips(db):
    big = {"blob": "x" * (1 << 20), "list": list(range(1000)), "nested": {"ü": "✓" * 1000}}
    event = db.events.publish("wf", "inbox", "big", big)
    assert event.payload == big
    assert db.events.get(event.id).payload == big
    assert db.connection.execute("SELECT length(payload) > 1048576 FROM events").fetchall() == [(1,)]


def test_payload_of_any_json_type(db):
    for i, value in enumerate([0, -1.5, "text", [1, [2]], True, None, {}]):
        assert db.events.publish("wf", "inbox", f"m{i}", value).payload == value
        assert db.events.get(eid("wf", "inbox", f"m{i}")).payload == value


# -- reading and ordering ----------------------------------------------------------------------


def test_peek_is_oldest_first_by_the_manual_clock(db, clock):
    for name, step in [("late", 30), ("early", 0), ("middle", 0)]:
        clock.set(T0 + step)
        db.events.publish("wf", "inbox", name, name)
    clock.set(T0 + 10)
    db.events.publish("wf", "inbox", "middle", "middle-again")  # an upsert keeps its place
    assert [e.message_id for e in db.events.peek("wf", "inbox")] == ["early", "middle", "late"]


def test_peek_breaks_timestamp_ties_by_id(db):
    names = [f"m{i}" for i in range(6)]
    for name in names:
        db.events.publish("wf", "inbox", name, 0)  # all at the same millisecond
    expected = sorted(eid("wf", "inbox", n) for n in names)
    assert [e.id for e in db.events.peek("wf", "inbox")] == expected
    assert [e.id for e in db.events.peek("wf", "inbox", limit=2)] == expected[:2]


def test_peek_filters_by_status_and_topic(db, five):
    db.events.publish("wf", "outbox", "o1", 0)
    db.events.reserve("run", "wf", {"inbox": ["m1", "m3"]})
    assert [e.message_id for e in db.events.peek("wf", "inbox")] == ["m0", "m2", "m4"]
    assert [e.message_id for e in db.events.peek("wf", "inbox", status=RESERVED)] == ["m1", "m3"]
    assert [e.message_id for e in db.events.peek("wf", "inbox", status=None)] == ["m0", "m1", "m2", "m3", "m4"]
    assert db.events.peek("wf", "inbox", status=CONSUMED) == []
    assert db.events.peek("wf", "inbox", limit=0) == []
    assert db.events.peek("wf", "nowhere") == []
    with pytest.raises(ValueError, match="unknown event status 'done'"):
        db.events.peek("wf", "inbox", status="done")


def test_get_by_message_ids_keeps_the_requested_order(db, five):
    found = db.events.get_by_message_ids("wf", "inbox", ["m3", "missing", "m0", "m3"])
    assert [e.message_id for e in found] == ["m3", "m0"]
    assert db.events.get_by_message_ids("wf", "inbox", []) == []
    assert db.events.get_by_message_ids("other", "inbox", ["m0"]) == []


def test_get_by_message_ids_beyond_one_chunk(db):
    with db.transaction() as tx:
        for i in range(1_200):
            db.events.publish("wf", "inbox", f"m{i}", i, tx=tx)
    wanted = [f"m{i}" for i in range(1_199, -1, -1)]
    assert [e.payload for e in db.events.get_by_message_ids("wf", "inbox", wanted)] == list(range(1_199, -1, -1))
    assert len(db.events.reserve("run", "wf", {"inbox": wanted})) == 1_200
    assert db.events.count_pending("wf", "inbox") == 0


def test_missing_events_read_as_none(db):
    assert db.events.get("0" * 32) is None
    assert db.events.get_by_message_id(topic_id("wf", "inbox"), "nope") is None


# -- reservations ----------------------------------------------------------------------------------


def test_reserve_returns_ids_in_request_order_and_marks_the_rows(db, five, clock):
    clock.advance(100)
    got = db.events.reserve("run", "wf", {"inbox": ["m4", "m1", "missing"], "no-topic": ["m0"]})
    assert got == [five[4], five[1]]
    held = db.events.reserved_by("run")
    assert [e.message_id for e in held] == ["m1", "m4"]  # oldest first
    assert {(e.status, e.reserved_by_run_id, e.updated_at) for e in held} == {(RESERVED, "run", T0 + 105)}
    assert statuses(db, "wf", "inbox")["m0"] == (PENDING, "", 1)


def test_reserve_ignores_non_pending_events(db, five):
    assert db.events.reserve("r1", "wf", {"inbox": ["m0", "m1", "m2"]}) == five[:3]
    assert db.events.consume("r1") == 3
    db.events.reserve("r2", "wf", {"inbox": ["m3"]})
    db.events.reserve("r3", "wf", {"inbox": ["m4"]})
    db.events.skip("r3")
    assert db.events.reserve("r4", "wf", {"inbox": ["m0", "m1", "m2", "m3", "m4"]}) == []
    assert db.events.reserved_by("r4") == []
    assert statuses(db, "wf", "inbox") == {
        "m0": (CONSUMED, "r1", 1), "m1": (CONSUMED, "r1", 1), "m2": (CONSUMED, "r1", 1),
        "m3": (RESERVED, "r2", 1), "m4": (SKIPPED, "r3", 1)}


def test_reserve_ignores_events_of_another_workflow(db):
    mine = db.events.publish("wf-a", "inbox", "m1", "a")
    theirs = db.events.publish("wf-b", "inbox", "m1", "b")
    assert db.events.reserve("run", "wf-a", {"inbox": ["m1"]}) == [mine.id]
    assert db.events.get(theirs.id).status == PENDING
    # The workflow filter is explicit, not only implied by the id: a row whose workflow
    # column says otherwise (e.g. damaged by hand) is not reserved for wf-a.
    stray = db.events.publish("wf-a", "inbox", "m2", "stray")
    db.connection.execute("UPDATE events SET workflow_id = 'wf-b' WHERE id = ?", (stray.id,))
    assert db.events.reserve("run", "wf-a", {"inbox": ["m2"]}) == []
    assert db.events.get(stray.id).status == PENDING


def test_consume_settles_only_that_runs_reservations(db, five, clock):
    db.events.reserve("r1", "wf", {"inbox": ["m0", "m1"]})
    db.events.reserve("r2", "wf", {"inbox": ["m2"]})
    clock.advance(7)
    assert db.events.consume("r1") == 2
    assert db.events.reserved_by("r1") == []
    consumed = db.events.peek("wf", "inbox", status=CONSUMED)
    assert [(e.message_id, e.reserved_by_run_id, e.updated_at) for e in consumed] == [
        ("m0", "r1", T0 + 12), ("m1", "r1", T0 + 12)]
    assert statuses(db, "wf", "inbox")["m2"] == (RESERVED, "r2", 1)


def test_consume_of_a_run_without_reservations_returns_zero_and_changes_nothing(db, five):
    before = db.events.peek("wf", "inbox", status=None)
    assert db.events.consume("never-reserved") == 0
    assert db.events.skip("never-reserved") == 0
    assert db.events.release("never-reserved") == 0
    assert db.events.transfer_reservations("never-reserved", "other") == 0
    db.events.reserve("r1", "wf", {"inbox": ["m0"]})
    assert db.events.consume("r1") == 1
    assert db.events.consume("r1") == 0  # a repeated commit is harmless
    assert db.events.skip("r1") == 0     # consumed events are not re-settled
    assert db.events.release("r1") == 0
    assert db.events.peek("wf", "inbox", status=None)[1:] == before[1:]


def test_skip_marks_reserved_events_skipped(db, five):
    db.events.reserve("r1", "wf", {"inbox": ["m2", "m3"]})
    assert db.events.skip("r1") == 2
    assert [e.message_id for e in db.events.peek("wf", "inbox", status=SKIPPED)] == ["m2", "m3"]
    assert db.events.count_pending("wf", "inbox") == 3


def test_release_cycles_count_attempts(db, five):
    target = five[0]
    for attempt in range(1, 5):
        run = f"run-{attempt}"
        assert db.events.reserve(run, "wf", {"inbox": ["m0"]}) == [target]
        held = db.events.get(target)
        assert (held.status, held.reserved_by_run_id, held.attempt_number) == (RESERVED, run, attempt)
        assert db.events.release(run) == 1
        back = db.events.get(target)
        assert (back.status, back.reserved_by_run_id, back.attempt_number) == (PENDING, "", attempt + 1)
    assert db.events.reserve("last", "wf", {"inbox": ["m0"]}) == [target]
    assert db.events.consume("last") == 1
    assert db.events.get(target).attempt_number == 5
    assert [db.events.get(i).attempt_number for i in five[1:]] == [1, 1, 1, 1]


def test_transfer_reservations_hands_events_to_the_new_run(db, five):
    db.events.reserve("old", "wf", {"inbox": ["m0", "m1"]})
    db.events.reserve("other", "wf", {"inbox": ["m2"]})
    assert db.events.transfer_reservations("old", "new") == 2
    assert db.events.reserved_by("old") == []
    assert [e.message_id for e in db.events.reserved_by("new")] == ["m0", "m1"]
    assert db.events.consume("old") == 0
    assert db.events.consume("new") == 2
    assert statuses(db, "wf", "inbox")["m2"] == (RESERVED, "other", 1)
    with pytest.raises(ValueError, match="to itself"):
        db.events.transfer_reservations("other", "other")


def test_pending_counts(db, five):
    db.events.publish("wf", "outbox", "o1", 0)
    db.events.publish("other-wf", "inbox", "x", 0)
    db.events.reserve("r", "wf", {"inbox": ["m0"]})
    assert db.events.count_pending("wf", "inbox") == 4
    assert db.events.count_pending("wf", "nowhere") == 0
    assert db.events.count_pending_by_topic("wf", ["inbox", "outbox", "nowhere", "inbox"]) == {
        "inbox": 4, "outbox": 1, "nowhere": 0}
    assert db.events.count_pending_by_topic("wf", []) == {}
    assert db.events.has_pending("wf", ["nowhere", "outbox"]) is True
    assert db.events.has_pending("wf", ["nowhere"]) is False
    assert db.events.has_pending("wf", []) is False
    db.events.reserve("r", "wf", {"outbox": ["o1"]})
    assert db.events.has_pending("wf", ["outbox"]) is False


# -- deleting ------------------------------------------------------------------------------------------


def test_delete_by_topic_counts_and_reads_back(db, five):
    kept = db.events.publish("wf", "outbox", "o1", 0)
    tid = topic_id("wf", "inbox")
    assert db.events.delete_by_topic(tid) == 5
    assert [db.events.get(i) for i in five] == [None] * 5
    assert db.events.peek("wf", "inbox", status=None) == []
    assert db.events.get(kept.id) == kept
    assert db.events.delete_by_topic(tid) == 0
    assert db.topics.get(tid) is not None  # the topic row is the topic store's


def test_delete_by_workflow_counts_and_reads_back(db, five):
    other = db.events.publish("other", "inbox", "m0", 0)
    assert db.events.delete_by_workflow("wf") == 5
    assert [db.events.get(i) for i in five] == [None] * 5
    assert db.events.get(other.id) == other
    assert db.events.delete_by_workflow("wf") == 0
    assert count(db, "events") == 1


def test_a_deleted_event_can_be_published_again_as_new(db, clock):
    first = db.events.publish("wf", "inbox", "m1", 1)
    db.events.reserve("r", "wf", {"inbox": ["m1"]})
    assert db.events.delete_by_workflow("wf") == 1
    clock.advance(9)
    again = db.events.publish("wf", "inbox", "m1", 2)
    assert (again.id, again.status, again.reserved_by_run_id, again.payload, again.created_at) == (
        first.id, PENDING, "", 2, T0 + 9)


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column, bad", [("payload", "{not json"), ("caused_by", "[1,")])
def test_malformed_json_is_a_corrupt_data_error_naming_table_id_column(db, column, bad):
    event = db.events.publish("wf", "inbox", "m1", {"ok": True})
    db.connection.execute(f"UPDATE events SET {column} = ? WHERE id = ?", (bad, event.id))
    readers = [
        lambda: db.events.get(event.id),
        lambda: db.events.peek("wf", "inbox"),
        lambda: db.events.get_by_message_ids("wf", "inbox", ["m1"]),
        lambda: db.events.get_by_message_id(event.topic_id, "m1"),
        lambda: db.events.peek("wf", "inbox", status=None, limit=None),
    ]
    for read in readers:
        with pytest.raises(CorruptDataError) as caught:
            read()
        assert (caught.value.table, caught.value.id, caught.value.column) == ("events", event.id, column)
        assert f"events row {event.id!r}: column {column!r}" in str(caught.value)


def test_corrupt_reserved_event_is_reported_by_reserved_by(db):
    event = db.events.publish("wf", "inbox", "m1", 1)
    db.events.reserve("r", "wf", {"inbox": ["m1"]})
    db.connection.execute("UPDATE events SET payload = 'nope' WHERE id = ?", (event.id,))
    with pytest.raises(CorruptDataError, match="payload"):
        db.events.reserved_by("r")
    assert db.events.consume("r") == 1  # settling does not need to decode


@pytest.mark.parametrize("call", [
    lambda db: db.events.publish("", "inbox", "m", 1),
    lambda db: db.events.publish("wf", "", "m", 1),
    lambda db: db.events.publish("wf", "inbox", "", 1),
    lambda db: db.events.publish("wf", "inbox", "m", 1, caused_by=[""]),
    lambda db: db.events.get(""),
    lambda db: db.events.get_by_message_id("", "m"),
    lambda db: db.events.get_by_message_id("t", ""),
    lambda db: db.events.get_by_message_ids("wf", "inbox", ["m", ""]),
    lambda db: db.events.peek("", "inbox"),
    lambda db: db.events.peek("wf", ""),
    lambda db: db.events.reserve("", "wf", {"inbox": ["m"]}),
    lambda db: db.events.reserve("r", "", {"inbox": ["m"]}),
    lambda db: db.events.reserve("r", "wf", {"": ["m"]}),
    lambda db: db.events.reserve("r", "wf", {"inbox": [""]}),
    lambda db: db.events.consume(""),
    lambda db: db.events.skip(""),
    lambda db: db.events.release(""),
    lambda db: db.events.transfer_reservations("", "b"),
    lambda db: db.events.transfer_reservations("a", ""),
    lambda db: db.events.reserved_by(""),
    lambda db: db.events.count_pending("", "inbox"),
    lambda db: db.events.count_pending("wf", ""),
    lambda db: db.events.count_pending_by_topic("wf", ["inbox", ""]),
    lambda db: db.events.has_pending("", ["inbox"]),
    lambda db: db.events.has_pending("wf", [""]),
    lambda db: db.events.delete_by_topic(""),
    lambda db: db.events.delete_by_workflow(""),
])
def test_empty_identifiers_are_refused(db, call):
    db.events.publish("wf", "inbox", "m", 1)
    with pytest.raises(ValueError, match="must not be empty"):
        call(db)
    assert statuses(db, "wf", "inbox") == {"m": (PENDING, "", 1)}


def test_a_single_string_is_not_taken_for_a_list_of_ids(db):
    db.events.publish("wf", "inbox", "m", 1)
    with pytest.raises(ValueError, match="collection of strings"):
        db.events.reserve("r", "wf", {"inbox": "m"})
    with pytest.raises(ValueError, match="collection of strings"):
        db.events.has_pending("wf", "inbox")


@pytest.mark.parametrize("name", ODD)
def test_injection_looking_names_and_message_ids_are_verbatim(db, name):
    event = db.events.publish(name, name, name, {name: name}, created_by_run_id=name, caused_by=[name])
    assert (event.workflow_id, event.message_id, event.payload, event.caused_by) == (name, name, {name: name}, [name])
    assert db.events.get_by_message_ids(name, name, [name]) == [event]
    assert db.events.reserve(name, name, {name: [name]}) == [event.id]
    assert [e.id for e in db.events.reserved_by(name)] == [event.id]
    assert db.events.consume(name) == 1
    assert db.events.count_pending_by_topic(name, [name, name + "%"]) == {name: 0, name + "%": 0}
    assert db.events.delete_by_workflow(name + "%") == 0
    assert db.events.delete_by_workflow(name) == 1
    assert count(db, "topics") == 1


# -- determinism across replicas ------------------------------------------------------------------


def test_same_event_has_the_same_id_on_two_replicas(open_db):
    a, b = open_db("a"), open_db("b")
    on_a = a.events.publish("wf", "inbox", "m1", {"v": 1})
    on_b = b.events.publish("wf", "inbox", "m1", {"v": 2})
    assert on_a.id == on_b.id == deterministic_id(deterministic_id("wf", "inbox"), "m1")
    assert on_a.topic_id == on_b.topic_id


# -- transactions across the stores -------------------------------------------------------------


class Boom(Exception):
    pass


def test_multi_store_transaction_rolled_back_leaves_nothing(db):
    with pytest.raises(Boom):
        with db.transaction() as tx:
            db.topics.create("wf", "declared", tx=tx)
            db.events.publish("wf", "inbox", "m1", 1, tx=tx)
            db.events.reserve("run", "wf", {"inbox": ["m1"]}, tx=tx)
            db.handler_state.set("wf", "h", {"n": 1}, tx=tx)
            raise Boom
    assert (count(db, "topics"), count(db, "events"), count(db, "handler_state")) == (0, 0, 0)
    assert db.topics.list("wf") == []
    assert db.handler_state.get("wf", "h") is None


def test_rollback_keeps_earlier_committed_state(db):
    db.events.publish("wf", "inbox", "m1", 1)
    db.handler_state.set("wf", "h", {"n": 1})
    with pytest.raises(Boom):
        with db.transaction() as tx:
            db.events.reserve("run", "wf", {"inbox": ["m1"]}, tx=tx)
            assert db.events.consume("run", tx=tx) == 1
            db.handler_state.set("wf", "h", {"n": 2}, tx=tx)
            raise Boom
    assert statuses(db, "wf", "inbox") == {"m1": (PENDING, "", 1)}
    assert db.handler_state.get("wf", "h").state == {"n": 1}


def test_nested_savepoint_rollback_undoes_only_the_inner_work(db):
    with db.transaction() as tx:
        db.events.publish("wf", "inbox", "outer", 1, tx=tx)
        with pytest.raises(Boom):
            with db.transaction(tx) as inner:
                db.events.publish("wf", "other", "inner", 2, tx=inner)
                db.events.reserve("run", "wf", {"inbox": ["outer"]}, tx=inner)
                db.handler_state.set("wf", "h", "inner", tx=inner)
                raise Boom
        db.handler_state.set("wf", "h2", "outer", tx=tx)
    assert statuses(db, "wf", "inbox") == {"outer": (PENDING, "", 1)}
    assert db.topics.get_by_name("wf", "other") is None
    assert db.events.peek("wf", "other", status=None) == []
    assert db.handler_state.get("wf", "h") is None
    assert db.handler_state.get("wf", "h2").state == "outer"


def test_a_failing_store_call_does_not_spoil_the_surrounding_transaction(db):
    from engine import AlreadyExistsError, NotFoundError

    with db.transaction() as tx:
        db.topics.create("wf", "inbox", tx=tx)
        db.events.publish("wf", "inbox", "m1", 1, tx=tx)
        with pytest.raises(AlreadyExistsError):
            db.topics.create("wf", "inbox", tx=tx)
        with pytest.raises(TypeError):
            db.events.publish("wf", "new-topic", "m2", object(), tx=tx)
        with pytest.raises(NotFoundError):
            db.handler_state.set_wake_at("wf", "nobody", 5, tx=tx)
    assert [t.name for t in db.topics.list("wf")] == ["inbox"]
    assert statuses(db, "wf", "inbox") == {"m1": (PENDING, "", 1)}
    assert db.handler_state.list_by_workflow("wf") == []


def test_calls_with_tx_see_their_own_uncommitted_writes_and_others_do_not(db, open_db):
    other = open_db("db")  # a second connection to the same file
    with db.transaction() as tx:
        event = db.events.publish("wf", "inbox", "m1", 1, tx=tx)
        db.handler_state.set("wf", "h", [1], tx=tx)
        assert db.events.get(event.id, tx=tx) == event
        assert db.topics.get_by_name("wf", "inbox", tx=tx).id == event.topic_id
        assert db.events.reserve("run", "wf", {"inbox": ["m1"]}, tx=tx) == [event.id]
        assert [e.id for e in db.events.reserved_by("run", tx=tx)] == [event.id]
        assert db.events.count_pending("wf", "inbox", tx=tx) == 0
        assert db.handler_state.get("wf", "h", tx=tx).state == [1]
        # another connection sees none of it yet
        assert other.events.get(event.id) is None
        assert other.topics.list("wf") == []
        assert other.handler_state.get("wf", "h") is None
    assert other.events.get(event.id).status == RESERVED
    assert other.handler_state.get("wf", "h").state == [1]


def test_tx_of_another_database_is_refused(db, open_db):
    other = open_db("other")
    with other.transaction() as tx:
        with pytest.raises(EngineError, match="another database"):
            db.events.publish("wf", "inbox", "m1", 1, tx=tx)
    assert count(db, "events") == 0
