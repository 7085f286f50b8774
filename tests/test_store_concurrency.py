"""Races on the topic, event and handler state stores: 8 threads sharing one Database, 4
threads each with its own connection, and 2 processes opening the same file. Every race
must end with exactly one winner per event, one row per topic, and nothing lost."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine import AlreadyExistsError, Database
from engine.events import PENDING, RESERVED, event_id
from engine.topics import topic_id

WF = "wf"
EVENTS = 120
TOPIC_NAMES = [f"topic-{i}" for i in range(20)]


def publish_events(db: Database, n: int = EVENTS) -> list[str]:
    with db.transaction() as tx:
        return [db.events.publish(WF, "inbox", f"m{i}", {"i": i}, tx=tx).id for i in range(n)]


def reserve_one_by_one(db: Database, run_id: str, seed: int, barrier) -> list[str]:
    """Reserve every message separately in a shuffled order (many small transactions that
    interleave with the other racers); return the ids this run won."""
    order = [f"m{i}" for i in range(EVENTS)]
    random.Random(seed).shuffle(order)
    barrier.wait()
    won = []
    for message_id in order:
        won += db.events.reserve(run_id, WF, {"inbox": [message_id]})
    return won


def churn(db: Database, run_id: str, rounds: int, barrier) -> int:
    """Reserve and release one shared event `rounds` times; return how many releases hit."""
    barrier.wait()
    released = 0
    for _ in range(rounds):
        if db.events.reserve(run_id, WF, {"shared": ["s"]}):
            released += db.events.release(run_id)
    return released


def run_threads(count: int, work) -> list:
    """Run work(i, barrier) on `count` threads that start together; re-raise any failure."""
    barrier = threading.Barrier(count, timeout=30)
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(work, i, barrier) for i in range(count)]
        return [f.result(timeout=60) for f in futures]


def assert_one_winner_each(db: Database, ids: list[str], wins: dict[str, list[str]]) -> None:
    """Every event was won by exactly one run, and the stored rows agree with the winners."""
    claimed = Counter(i for won in wins.values() for i in won)
    assert sorted(claimed) == sorted(ids)
    assert set(claimed.values()) == {1}
    for run_id, won in wins.items():
        held = db.events.reserved_by(run_id)
        assert sorted(e.id for e in held) == sorted(won)
        assert {(e.status, e.attempt_number) for e in held} <= {(RESERVED, 1)}
    assert db.events.count_pending(WF, "inbox") == 0


# -- threads sharing one Database -------------------------------------------------------------


def test_eight_threads_reserving_the_same_events_have_one_winner_each(db):
    ids = publish_events(db)
    results = run_threads(8, lambda i, b: reserve_one_by_one(db, f"run-{i}", i, b))
    wins = {f"run-{i}": won for i, won in enumerate(results)}
    assert_one_winner_each(db, ids, wins)


def test_eight_threads_reserving_everything_at_once_one_takes_all(db):
    ids = publish_events(db)

    def grab(i, barrier):
        barrier.wait()
        return db.events.reserve(f"run-{i}", WF, {"inbox": [f"m{n}" for n in range(EVENTS)]})

    results = run_threads(8, grab)
    assert sorted(len(r) for r in results) == [0] * 7 + [EVENTS]
    assert_one_winner_each(db, ids, {f"run-{i}": won for i, won in enumerate(results)})


def test_eight_threads_get_or_create_the_same_topics(db):
    def work(i, barrier):
        names = TOPIC_NAMES[:]
        random.Random(i).shuffle(names)
        barrier.wait()
        return {name: db.topics.get_or_create(WF, name) for name in names}

    results = run_threads(8, work)
    for name in TOPIC_NAMES:
        rows = {r[name] for r in results}
        assert len(rows) == 1 and rows.pop().id == topic_id(WF, name)
    assert [t.name for t in db.topics.list(WF)] == sorted(TOPIC_NAMES)


def test_eight_threads_create_the_same_topic_exactly_one_succeeds(db):
    def work(i, barrier):
        barrier.wait()
        try:
            return db.topics.create(WF, "only-once")
        except AlreadyExistsError:
            return None

    results = run_threads(8, work)
    created = [r for r in results if r is not None]
    assert len(created) == 1
    assert db.topics.list(WF) == created


def test_eight_threads_publishing_lose_nothing(db):
    def work(i, barrier):
        barrier.wait()
        for n in range(40):
            db.events.publish(WF, "inbox", f"t{i}-m{n}", n)
            db.events.publish(WF, "inbox", f"shared-{n % 5}", i)  # same 5 ids from every thread
        db.handler_state.set(WF, f"h{i}", i)
        return i

    run_threads(8, work)
    assert db.events.count_pending(WF, "inbox") == 8 * 40 + 5
    assert len(db.topics.list(WF)) == 1
    assert [r.state for r in db.handler_state.list_by_workflow(WF)] == list(range(8))


def test_eight_threads_reserve_release_churn_counts_every_attempt(db):
    db.events.publish(WF, "shared", "s", 0)
    released = run_threads(8, lambda i, b: churn(db, f"run-{i}", 25, b))
    event = db.events.get(event_id(topic_id(WF, "shared"), "s"))
    assert (event.status, event.reserved_by_run_id) == (PENDING, "")
    assert event.attempt_number == 1 + sum(released)
    assert sum(released) >= 1  # how many win depends on the interleaving; the count above must match it


def test_four_connections_in_threads_reserving_the_same_events(db, open_db):
    ids = publish_events(db)
    connections = [open_db("db") for _ in range(4)]  # four Database objects, one file
    results = run_threads(4, lambda i, b: reserve_one_by_one(connections[i], f"run-{i}", i + 10, b))
    assert_one_winner_each(db, ids, {f"run-{i}": won for i, won in enumerate(results)})


# -- two processes on one file ------------------------------------------------------------------


def _process_worker(path: str, index: int, barrier, results) -> None:
    """In a child process: open the file and race the other process (a module-level
    function so that the spawn start method can import it)."""
    try:
        with Database.open(path) as db:
            won = reserve_one_by_one(db, f"proc-{index}", 100 + index, barrier)
            names = TOPIC_NAMES[:]
            random.Random(index).shuffle(names)
            topics = {name: db.topics.get_or_create(WF, name).id for name in names}
            for n in range(30):
                db.events.publish(WF, "from-procs", f"p{index}-m{n}", n)
                db.events.publish(WF, "from-procs", f"both-{n}", index)
            released = churn(db, f"churn-{index}", 20, barrier)  # not proc-i: release frees all it holds
            results.put((index, won, topics, released, None))
    except BaseException as error:  # reported to the parent, which fails the test with it
        results.put((index, [], {}, 0, repr(error)))


def test_two_processes_race_on_one_file(db, tmp_path):
    ids = publish_events(db)
    db.events.publish(WF, "shared", "s", 0)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding SQLite handles
    barrier, results = context.Barrier(2, timeout=60), context.Queue()
    processes = [context.Process(target=_process_worker, args=(db.path, i, barrier, results)) for i in range(2)]
    for process in processes:
        process.start()
    try:
        reports = sorted(results.get(timeout=120) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [r[4] for r in reports] == [None, None]
    assert [p.exitcode for p in processes] == [0, 0]

    assert_one_winner_each(db, ids, {f"proc-{index}": won for index, won, *_ in reports})
    for index, _won, topics, _released, _error in reports:
        assert topics == {name: topic_id(WF, name) for name in TOPIC_NAMES}
    assert len(db.topics.list(WF)) == len(TOPIC_NAMES) + 3  # + inbox, shared, from-procs
    assert db.events.count_pending(WF, "from-procs") == 2 * 30 + 30
    shared = db.events.get(event_id(topic_id(WF, "shared"), "s"))
    assert (shared.status, shared.attempt_number) == (PENDING, 1 + sum(r[3] for r in reports))


@pytest.mark.parametrize("method", ["consume", "skip"])
def test_settling_races_with_transfer_leave_each_event_in_one_place(db, method):
    """A consume (or skip) by the old run racing a transfer to a retry run: each event is
    settled by exactly one of them, never both, never lost."""
    ids = publish_events(db)
    db.events.reserve("old", WF, {"inbox": [f"m{i}" for i in range(EVENTS)]})

    def work(i, barrier):
        barrier.wait()
        if i == 0:
            return getattr(db.events, method)("old")
        return db.events.transfer_reservations("old", "retry")

    settled, transferred = run_threads(2, work)
    assert settled + transferred == EVENTS and sorted([settled, transferred]) == [0, EVENTS]
    assert len(db.events.reserved_by("retry")) == transferred
    assert len(ids) == EVENTS
