"""Deletes under concurrency, on the real extension (README: "Running on several replicas").

cr-sqlite's rule, checked first: a delete beats concurrent updates of the row (an update made
without having seen the delete is dropped, it does not bring the row back); an insert made
after seeing the delete re-creates the row. What the engine adds on top:

- a topic deleted while another replica publishes to it comes back (the audit re-creates the
  row from the local name record) holding only the messages published concurrently;
- a run deleted while another replica advances it stays deleted; events it held reserved are
  released by the audit (nobody holds them any more), events it consumed stay consumed;
- handler state deleted while another replica sets it stays deleted; a later set re-creates it.
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

from engine import NotFoundError
from engine.events import event_id
from engine.topics import topic_id

TOPIC = topic_id("wf", "inbox")


@pytest.fixture
def pair(tmp_path):
    replicas = open_replicas(tmp_path, 2)
    yield replicas
    close_all(replicas)


def messages(db):
    return sorted(e.message_id for e in db.events.peek("wf", "inbox", status=None))


def delete_topic(db):
    """Delete the topic and its events in one transaction (the cascade the topic store documents)."""
    with db.transaction() as tx:
        db.events.delete_by_topic(TOPIC, tx=tx)
        return db.topics.delete(TOPIC, tx=tx)


def test_cr_sqlite_a_delete_beats_a_concurrent_update_and_an_insert_after_it_recreates(pair):
    a, b = pair
    a.db.handler_state.set("wf", "h", {"n": 1})
    sync_until_quiet(pair)
    a.db.handler_state.delete("wf", "h")
    with b.db.transaction() as tx:
        tx.execute("UPDATE handler_state SET state = '{\"n\":2}'")
    sync_until_quiet(pair)
    assert every(pair, lambda db: rows(db)["handler_state"]) == []


# -- topics ----------------------------------------------------------------------------------------


def test_a_topic_deleted_while_another_replica_publishes_comes_back_with_the_new_messages(pair):
    a, b = pair
    a.db.events.publish("wf", "inbox", "old", {})
    sync_until_quiet(pair)
    assert delete_topic(a.db) == 1
    b.clock.advance(10)
    b.db.events.publish("wf", "inbox", "new", {"late": True})
    sync_until_quiet(pair)
    # The row is re-created with its original name and creation time (from __engine_topic_names).
    assert every(pair, lambda db: rows(db)["topics"]) == [(TOPIC, "wf", "inbox", START)]
    assert every(pair, messages) == ["new"]  # what a saw when it deleted stays deleted
    assert every(pair, lambda db: db.topics.list("wf")[0].name) == "inbox"
    assert_converged(pair)
    no_violations(pair)


def test_a_publish_after_seeing_the_delete_recreates_the_topic_itself(pair):
    a, b = pair
    a.db.events.publish("wf", "inbox", "old", {})
    sync_until_quiet(pair)
    delete_topic(a.db)
    sync_until_quiet(pair)
    assert every(pair, lambda db: (rows(db)["topics"], messages(db))) == ([], [])
    b.clock.advance(10)
    b.db.events.publish("wf", "inbox", "again", {})
    sync_until_quiet(pair)
    assert every(pair, lambda db: rows(db)["topics"]) == [(TOPIC, "wf", "inbox", START + 10)]
    assert every(pair, messages) == ["again"]
    no_violations(pair)


def test_events_deleted_while_another_replica_reserves_them_stay_deleted(pair):
    a, b = pair
    b.db.ownership.claim("wf")
    b.db.events.publish("wf", "inbox", "m1", {})
    sync_until_quiet(pair)
    delete_topic(a.db)
    run = b.db.execution.start_run(script_run_id="s", workflow_id="wf", handler_type="consumer", handler_name="h")
    b.db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result=None)
    sync_until_quiet(pair)
    assert every(pair, lambda db: (rows(db)["topics"], messages(db))) == ([], [])
    b.db.execution.commit_consumer(run.id)  # it holds nothing any more: consumes nothing
    sync_until_quiet(pair)
    assert every(pair, lambda db: db.handler_runs.get(run.id).status) == "committed"
    no_violations(pair)


# -- runs ------------------------------------------------------------------------------------------


def started(replica, *reserve):
    run = replica.db.execution.start_run(script_run_id="session-1", workflow_id="wf", handler_type="consumer",
                                         handler_name="h")
    replica.db.execution.prepare_consumer(run.id, reservations={"inbox": list(reserve)}, prepare_result=None)
    return run


def test_a_run_deleted_by_session_while_another_replica_commits_it_stays_deleted(pair):
    a, b = pair
    b.db.ownership.claim("wf")
    b.db.events.publish("wf", "inbox", "m1", {})
    run = started(b, "m1")
    sync_until_quiet(pair)
    assert a.db.handler_runs.delete_by_session("session-1") == 1
    b.db.execution.commit_consumer(run.id, state={"done": 1})
    sync_until_quiet(pair)
    assert every(pair, lambda db: rows(db)["handler_runs"]) == []
    m1 = every(pair, lambda db: db.events.get(event_id(TOPIC, "m1")))
    assert (m1.status, m1.reserved_by_run_id) == ("consumed", run.id)  # history: the run did consume it
    assert every(pair, lambda db: db.handler_state.get("wf", "h").state) == {"done": 1}
    with pytest.raises(NotFoundError):
        b.db.execution.commit_consumer(run.id)
    no_violations(pair)


def test_a_run_deleted_while_another_replica_advances_it_releases_what_it_held(pair):
    a, b = pair
    b.db.ownership.claim("wf")
    b.db.events.publish("wf", "inbox", "m1", {})
    run = started(b, "m1")
    sync_until_quiet(pair)
    a.db.handler_runs.delete_by_session("session-1")
    mutation = b.db.execution.begin_mutation(run.id, tool_namespace="mail", tool_method="send", params={})
    sync_until_quiet(pair)
    assert every(pair, lambda db: rows(db)["handler_runs"]) == []
    # Nobody holds m1 now: released, so another run processes it (the deleted run's mutation
    # row stays, in flight, for whoever reconciles it).
    m1 = every(pair, lambda db: db.events.get(event_id(TOPIC, "m1")))
    assert (m1.status, m1.reserved_by_run_id, m1.attempt_number) == ("pending", "", 1)
    assert every(pair, lambda db: db.mutations.get(mutation.id).status) == "in_flight"
    again = started(b, "m1")
    assert b.db.events.get(m1.id).reserved_by_run_id == again.id
    sync_until_quiet(pair)
    no_violations(pair)


# -- handler state -----------------------------------------------------------------------------------


def test_handler_state_deleted_while_another_replica_sets_it_stays_deleted_until_set_again(pair):
    a, b = pair
    a.db.handler_state.set("wf", "h", {"n": 1})
    sync_until_quiet(pair)
    assert a.db.handler_state.delete("wf", "h") == 1
    b.db.handler_state.set("wf", "h", {"n": 2})
    sync_until_quiet(pair)
    assert every(pair, lambda db: db.handler_state.get("wf", "h")) is None
    b.clock.advance(5)
    b.db.handler_state.set("wf", "h", {"n": 3})  # b has seen the delete: this re-creates the row
    sync_until_quiet(pair)
    row = every(pair, lambda db: db.handler_state.get("wf", "h"))
    assert (row.state, row.updated_at) == ({"n": 3}, START + 5)
    assert_converged(pair)
