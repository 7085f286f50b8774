"""Pages, parts, bounded memory, the after-apply hook and live mode.

Rounds to watch, pause or keep live go through the simulated network of sync.testing."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from sync import ApplyError, Peer, State
from sync.changes import CHANGE_COLUMNS, Limits
from sync.watermarks import watermarks
from sync.peer import run_in_process
from sync.protocol import Changes, decode
from sync.testing import assert_converged
from test_sync_support import state, topic, write

BIG_GROUP = int(os.environ.get("SYNC_BIG_GROUP_CHANGES", "200000"))


def bulk_insert(db, rows: int, *, prefix: str = "r", name: str = "n", workflow: str = "wf") -> None:
    """One transaction of `rows` topics (3 changes each), inserted by SQL."""
    with db.transaction() as tx:
        tx.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO topics (id, workflow_id, name, created_at) SELECT ? || i, ?, ? || i, i FROM n",
            (rows - 1, prefix, workflow, name),
        )


@pytest.mark.cluster(n=2, limits=Limits(page_changes=20))
def test_pages_hold_whole_groups_within_the_bound(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    for k in range(40):  # 40 transactions of 1..4 rows
        bulk_insert(a, 1 + k % 4, prefix=f"k{k}-")
    pages = cluster.sync(1, 0).pages(sender=0)
    assert all(len(p.rows) <= 20 for p in pages) and len(pages) >= 15
    for before, after in zip(pages, pages[1:]):
        assert max(r[5] for r in before.rows) <= before.upto == after.since < min(r[5] for r in after.rows)
    assert sum(len(p.rows) for p in pages) == 3 * sum(1 + k % 4 for k in range(40))
    assert state(b) == state(a)


@pytest.mark.cluster(n=2, limits=Limits(page_bytes=250_000))
def test_pages_are_bounded_in_bytes(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    for k in range(12):
        write(a, "INSERT INTO events (id, payload) VALUES (?, ?)", (f"e{k}", "x" * 100_000))
    rnd = cluster.sync(1, 0)
    sizes = [m.size for m in rnd.messages if m.sender == 0 and m.delivered]
    assert max(sizes) < 400_000 and len(rnd.pages(sender=0)) >= 4
    assert_converged([b, a])


@pytest.mark.cluster(n=2, limits=Limits(page_changes=400))
def test_a_group_larger_than_a_page_goes_in_parts_and_merges_at_once(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    bulk_insert(a, 1000)  # 3000 changes in one transaction
    topic(a, "after")
    pages = cluster.sync(1, 0).pages(sender=0)
    parts = [p for p in pages if p.upto == 1]
    assert [p.part for p in parts] == list(range(len(parts))) and len(parts) == 8
    assert [p.more_parts for p in parts] == [True] * 7 + [False]
    assert all(len(p.rows) <= 400 for p in pages)
    assert sum(len(p.rows) for p in parts) == 3000
    assert state(b) == state(a)
    assert not b.connection.in_transaction  # nothing of the group left open
    with b.reading() as s:
        # the whole group merged in one transaction: one db_version on b
        assert s.execute("SELECT DISTINCT db_version FROM crsql_changes WHERE pk IN "
                         "(SELECT pk FROM crsql_changes WHERE cid = 'name' AND val LIKE 'n%')") == [(1,)]


def _sync_watching_pages(a, b, limits: Limits, *, streaming: bool = False) -> dict:
    """A full in-process round b <- a; returns the largest page seen (rows, bytes)."""
    client = Peer(b, limits=limits).session("client", streaming=streaming)
    server = Peer(a, limits=limits).session("server", streaming=streaming)
    largest = {"bytes": 0, "rows": 0}
    receive = client.receive

    def watch(data: bytes) -> list[bytes]:
        message = decode(data)
        if isinstance(message, Changes):
            largest["bytes"] = max(largest["bytes"], len(data))
            largest["rows"] = max(largest["rows"], len(message.rows))
        return receive(data)

    client.receive = watch
    run_in_process(client, server)
    largest["result"] = client.result
    return largest


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["spilled", "merged-as-it-arrives"])
def test_a_200k_change_transaction_goes_in_bounded_pages_and_merges_whole(open_db, streaming):
    """One transaction of BIG_GROUP changes (200k by default): every message stays within
    the page bound, the receiver merges the group in one transaction (from the spilled parts,
    or part by part into a transaction held open until the last one)."""
    a, b = open_db("a"), open_db("b")
    bulk_insert(a, BIG_GROUP // 3)
    largest = _sync_watching_pages(a, b, Limits(page_changes=5000), streaming=streaming)
    assert largest["result"].pulled == 3 * (BIG_GROUP // 3)
    assert largest["result"].pages_received >= BIG_GROUP // 5000
    assert largest["rows"] <= 5000 and largest["bytes"] < 600_000
    with a.reading() as sa, b.reading() as sb:
        assert sa.scalar("SELECT count(*) FROM topics") == sb.scalar("SELECT count(*) FROM topics") == BIG_GROUP // 3
        assert sb.scalar("SELECT count(DISTINCT db_version) FROM crsql_changes") == 1
    assert not b.connection.in_transaction


def test_memory_stays_bounded_by_the_page_not_the_backlog(open_db):
    """tracemalloc peak while syncing 30k changes (one 15k-change transaction plus 100 of
    153) in pages of 1000: a few pages' worth, far below the backlog held as Python objects."""
    a, b = open_db("a"), open_db("b")
    bulk_insert(a, 5000)
    for k in range(100):
        bulk_insert(a, 51, prefix=f"k{k}-")
    tracemalloc.start()
    try:
        largest = _sync_watching_pages(a, b, Limits(page_changes=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert largest["result"].pulled == 3 * (5000 + 100 * 51) and largest["rows"] <= 1000
    tracemalloc.start()
    with a.reading() as s:
        backlog = s.execute(f"SELECT {CHANGE_COLUMNS} FROM crsql_changes")
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(backlog) == 30300
    assert peak < held / 3, f"peak {peak} bytes while the backlog alone takes {held}"
    assert state(b) == state(a)


@pytest.mark.cluster(n=2, limits=Limits(page_changes=100))
def test_writes_during_a_split_transfer_do_not_break_it(cluster):
    """The sender copies a big group aside: overwriting some of its rows mid-transfer moves
    them to a newer version, which follows in a later page."""
    a, b = cluster.replica(0), cluster.replica(1)
    bulk_insert(a, 300)
    with cluster.connect(1, 0) as link:
        link.deliver(limit=6)
        write(a, "UPDATE topics SET name = 'changed' WHERE id IN ('r0', 'r299')")
        link.deliver()  # finish the same round
    client = link.client
    assert client.finished and not client.failed
    assert len(state(b)) == 300
    Peer(b).sync_with(Peer(a))
    assert state(b) == state(a)
    assert [r for r in state(b) if r[2] == "changed"] == [("r0", "wf", "changed", 0), ("r299", "wf", "changed", 299)]


def test_merge_listener_runs_inside_the_merge(open_db):
    a, b = open_db("a"), open_db("b")
    write(a, "INSERT INTO topics (id, name) VALUES ('t1', 'x')")
    write(a, "INSERT INTO handler_state (id, state) VALUES ('s1', '{}')")
    pb = Peer(b)
    seen = []

    def audit(tx, merged):
        seen.append(sorted(merged))
        assert tx.connection.in_transaction
        # the merged rows are visible, and what the hook writes commits with the merge
        assert tx.scalar("SELECT name FROM topics WHERE id = 't1'") == "x"
        tx.execute("INSERT INTO handler_runs (id, error) VALUES ('audit', ?)", (str(len(merged)),))

    remove = b.on_merge(audit)
    pb.sync_with(Peer(a))
    assert seen == [[("handler_state", ("s1",)), ("topics", ("t1",))]]
    assert state(b, "handler_runs")[0][:1] == ("audit",)
    remove()
    write(a, "UPDATE topics SET name = 'y' WHERE id = 't1'")
    pb.sync_with(Peer(a))
    assert len(seen) == 1


def test_a_failing_merge_listener_rolls_the_merge_back(open_db):
    a, b = open_db("a"), open_db("b")
    topic(a, "t1")
    pb = Peer(b)

    def broken(tx, merged):
        raise RuntimeError("audit exploded")

    remove = b.on_merge(broken)
    with pytest.raises(ApplyError, match="merge listener .*broken failed: audit exploded"):
        pb.sync_with(Peer(a))
    assert state(b) == [] and watermarks(b) == []
    remove()
    pb.sync_with(Peer(a))
    assert state(b) == state(a)


def test_merge_listeners_see_every_row_of_a_staged_group(open_db):
    a, b = open_db("a"), open_db("b")
    bulk_insert(a, 50)
    limits = Limits(page_changes=40)
    pb = Peer(b, limits=limits)
    seen = set()
    b.on_merge(lambda tx, merged: seen.update(merged))
    pb.sync_with(Peer(a, limits=limits))
    assert seen == {("topics", (f"r{i}",)) for i in range(50)}


def test_apply_errors_become_apply_failed_refusals(open_db):
    a, b = open_db("a"), open_db("b")
    topic(a, "t1")
    pb = Peer(b)
    b.on_merge(lambda tx, merged: tx.execute("INSERT INTO no_such_table VALUES (1)"))
    with pytest.raises(ApplyError):
        pb.sync_with(Peer(a))
    assert state(b) == []


@pytest.mark.cluster(n=3)
def test_live_mode_pushes_new_commits_both_ways(cluster):
    a, b, c = cluster.replica(0), cluster.replica(1), cluster.replica(2)
    sessions = {}
    for name, index in (("b", 1), ("c", 2)):
        link = cluster.connect(index, 0, live=True)  # a is the hub
        link.deliver()
        client, server = link.client, link.server
        assert client.state is State.LIVE and server.state is State.LIVE and not client.finished
        sessions[name] = link

    def settle():
        """What a transport does on commit notifications: ask every session, deliver."""
        for _ in range(10):
            for link in sessions.values():
                link.notify()

    topic(b, "from-b")
    settle()
    assert state(a) == state(b) == state(c) == [("from-b", "wf", "", 0)]
    write(c, "UPDATE topics SET name = 'c was here' WHERE id = 'from-b'")
    settle()
    assert state(a) == state(b) == state(c) == [("from-b", "wf", "c was here", 0)]
    assert sessions["b"].client.local_changes() == []  # idle: nothing to send
    for link in sessions.values():
        assert not link.client.failed and not link.server.failed
        link.close()


@pytest.mark.cluster(n=3, limits=Limits(page_changes=50))
def test_a_relayed_split_transaction_is_split_again_and_never_echoed(cluster):
    a, b, c = cluster.replica(0), cluster.replica(1), cluster.replica(2)
    bulk_insert(a, 100)  # 300 changes, pages of 50
    pa, pb = cluster.peer(0), cluster.peer(1)
    assert pb.sync_with(pa).pulled == 300
    rnd = cluster.sync(2, 1)  # b merged the group as one version of its own: parts again
    parts = [p for p in rnd.pages(sender=1) if p.rows]
    assert len(parts) == 6 and [p.more_parts for p in parts] == [True] * 5 + [False]
    assert rnd.pushed == 0  # c does not send b's (a's) rows back
    assert state(c) == state(b) == state(a)
