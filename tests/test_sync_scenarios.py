"""Multi-replica scenarios with exact expected states (in-process transport, real schema).

Replicas come from the `cluster` fixture of sync.testing (two per test unless marked);
rounds that must stop mid-way go through its simulated network.
"""

from __future__ import annotations

import pytest

from engine import Database
from sync import DuplicateSiteError, Peer, export_changes, import_changes
from sync.changes import Limits
from sync.watermarks import watermarks
from sync.testing import Disconnect, assert_converged, rows
from test_sync_support import state, topic, write

pytestmark = pytest.mark.cluster(n=2)


@pytest.fixture
def pair(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    return a, b, Peer(a), Peer(b)


@pytest.fixture
def trio(cluster):
    return cluster.replica(0), cluster.replica(1), cluster.replica(2)


def test_insert_update_delete_on_each_side(pair):
    a, b, pa, pb = pair
    topic(a, "t1", "from-a")
    topic(b, "t2", "from-b")
    first = pa.sync_with(pb)
    assert (first.pulled, first.pushed) == (3, 3)
    assert state(a) == state(b) == [("t1", "wf", "from-a", 0), ("t2", "wf", "from-b", 0)]

    write(a, "UPDATE topics SET name = 'renamed-by-a' WHERE id = 't2'")
    write(b, "DELETE FROM topics WHERE id = 't1'")
    second = pb.sync_with(pa)
    assert (second.pulled, second.pushed) == (1, 1)
    assert state(a) == state(b) == [("t2", "wf", "renamed-by-a", 0)]


def test_resync_moves_nothing_and_own_changes_never_echo(pair):
    a, b, pa, pb = pair
    topic(a, "t1")
    topic(b, "t2")
    pa.sync_with(pb)
    again = pa.sync_with(pb)
    assert (again.pulled, again.pushed) == (0, 0)
    reverse = pb.sync_with(pa)
    assert (reverse.pulled, reverse.pushed) == (0, 0)
    with a.reading() as s:  # a holds b's change once and its own with its own site id
        sites = dict(s.execute("SELECT lower(hex(site_id)), count(*) FROM crsql_changes GROUP BY 1"))
    assert sites == {a.site_id: 3, b.site_id: 3}


@pytest.mark.cluster(n=3)
def test_concurrent_update_of_one_cell_has_one_winner_everywhere(trio):
    a, b, c = trio
    pa, pb, pc = Peer(a), Peer(b), Peer(c)
    topic(a, "t1", "base")
    pa.sync_with(pb)
    pc.sync_with(pa)
    write(a, "UPDATE topics SET name = 'zeta' WHERE id = 't1'")
    write(b, "UPDATE topics SET name = 'alpha' WHERE id = 't1'")
    write(c, "UPDATE topics SET name = 'mid' WHERE id = 't1'")
    pb.sync_with(pc)
    pa.sync_with(pb)
    pc.sync_with(pa)
    pb.sync_with(pc)
    # equal column versions: cr-sqlite breaks the tie by value, the greatest wins
    assert state(a) == state(b) == state(c) == [("t1", "wf", "zeta", 0)]


def test_more_updates_beat_a_greater_value(pair):
    a, b, pa, pb = pair
    topic(a, "t1", "base")
    pa.sync_with(pb)
    write(a, "UPDATE topics SET name = 'zzz' WHERE id = 't1'")
    write(b, "UPDATE topics SET name = 'b1' WHERE id = 't1'")
    write(b, "UPDATE topics SET name = 'b2' WHERE id = 't1'")  # column version 3 > 2
    pa.sync_with(pb)
    assert state(a) == state(b) == [("t1", "wf", "b2", 0)]


def test_delete_beats_a_concurrent_update(pair):
    a, b, pa, pb = pair
    topic(a, "t1", "base")
    topic(a, "t2", "kept")
    pa.sync_with(pb)
    write(a, "DELETE FROM topics WHERE id = 't1'")
    write(b, "UPDATE topics SET name = 'edited' WHERE id = 't1'")
    pb.sync_with(pa)
    assert state(a) == state(b) == [("t2", "wf", "kept", 0)]


def test_create_after_delete_resurrects_the_row(pair):
    a, b, pa, pb = pair
    topic(a, "t1", "first")
    pa.sync_with(pb)
    write(a, "DELETE FROM topics WHERE id = 't1'")
    pa.sync_with(pb)
    assert state(b) == []
    write(b, "INSERT INTO topics (id, name) VALUES ('t1', 'second life')")
    result = pb.sync_with(pa)
    assert result.pushed == 4  # the resurrection sentinel plus three columns
    assert state(a) == state(b) == [("t1", "", "second life", 0)]


@pytest.mark.cluster(n=3)
def test_relay_through_a_middle_peer(trio):
    a, b, c = trio
    pa, pb, pc = Peer(a), Peer(b), Peer(c)
    topic(a, "from-a")
    topic(c, "from-c")
    assert pa.sync_with(pb).pushed == 3
    via_b = pc.sync_with(pb)
    assert (via_b.pulled, via_b.pushed) == (3, 3)  # a's change reaches c; nothing echoes back
    back = pa.sync_with(pb)
    assert (back.pulled, back.pushed) == (3, 0)  # c's change reaches a
    assert state(a) == state(b) == state(c) == [("from-a", "wf", "", 0), ("from-c", "wf", "", 0)]
    assert pc.sync_with(pb).pulled == 0


def test_watermarks_are_per_peer_db_versions(pair):
    a, b, pa, pb = pair
    topic(a, "t1")
    topic(a, "t2")
    topic(b, "t3")
    pa.sync_with(pb)
    marks = {m.site_id: m for m in watermarks(a)}
    assert (marks[b.site_id].received, marks[b.site_id].acked) == (1, a.db_version) == (1, 3)
    assert {m.site_id: m.received for m in pb.watermarks()} == {a.site_id: 3}
    # b's version 2 holds only a's own changes (merged): the next round moves a's watermark
    # over it with an empty page instead of leaving it to be re-read forever
    assert b.db_version == 2
    again = pa.sync_with(pb)
    assert (again.pulled, again.pushed, again.pages_received) == (0, 0, 1)
    assert {m.site_id: m.received for m in watermarks(a)} == {b.site_id: 2}


@pytest.mark.cluster(n=2, limits=Limits(page_changes=10))
def test_a_transaction_never_straddles_pages(cluster):
    """Page bound 10 changes: tx1 has 6, tx2 has 9. Stop right after the first page: b has
    all of tx1 and nothing of tx2; then the round completes."""
    a, b = cluster.replica(0), cluster.replica(1)
    with a.transaction() as tx:
        for i in range(2):
            tx.execute("INSERT INTO topics (id, name) VALUES (?, 'tx1')", (f"one-{i}",))
    with a.transaction() as tx:
        for i in range(3):
            tx.execute("INSERT INTO topics (id, name) VALUES (?, 'tx2')", (f"two-{i}",))
    rnd = cluster.sync(1, 0, faults=[Disconnect(after=4)])  # hello, hello, pull, first page
    assert [len(p.rows) for p in rnd.pages(sender=0)] == [6]
    assert [row[2] for row in state(b)] == ["tx1", "tx1"]
    assert watermarks(b)[0].received == 1

    rnd = cluster.sync(1, 0)
    assert [len(p.rows) for p in rnd.pages(sender=0)] == [9]
    assert [row[2] for row in state(b)] == ["tx1", "tx1", "tx2", "tx2", "tx2"]


@pytest.mark.cluster(n=2, limits=Limits(page_changes=10))
def test_a_split_transaction_arrives_whole_or_not_at_all(cluster):
    """One transaction of 60 changes, pages of 10: it goes as parts; a round cut before the
    last part leaves none of its rows, the next round brings all of them."""
    a, b = cluster.replica(0), cluster.replica(1)
    with a.transaction() as tx:
        for i in range(20):
            tx.execute("INSERT INTO topics (id, name) VALUES (?, 'big')", (f"row-{i:02d}",))
    rnd = cluster.sync(1, 0, faults=[Disconnect(after=3 + 2 * 4)])  # handshake, then 4 parts and 3 acks
    parts = rnd.pages(sender=0)
    assert [p.part for p in parts] == [0, 1, 2, 3] and all(p.more_parts for p in parts)
    assert state(b) == []
    assert not b.connection.in_transaction  # nothing of the group left open

    rnd = cluster.sync(1, 0)
    parts = rnd.pages(sender=0)
    assert sum(len(p.rows) for p in parts) == 60 and parts[-1].more_parts is False
    assert state(b) == state(a)


def test_convergence_of_every_crr_table(pair):
    a, b, _, _ = pair
    write(a, "INSERT INTO events (id, topic_id, payload, attempt_number) VALUES ('e1', 't1', '{\"k\": 1}', 2)")
    write(b, "INSERT INTO handler_runs (id, handler_name, cost) VALUES ('r1', 'h', 0.25)")
    write(b, "INSERT INTO handler_state (id, state, wake_at) VALUES ('s1', x'00ff', -5)")
    write(a, "INSERT INTO mutations (id, params) VALUES ('m1', '')")
    Peer(a).sync_with(Peer(b))
    assert_converged([a, b])
    assert rows(b)["handler_state"][0][3] == b"\x00\xff"  # blob values keep their type


def test_a_replica_restored_from_an_older_backup_is_refused_until_cloned(open_db, tmp_path):
    """b holds a's changes up to db_version 3; a restored backup of a (at version 1) numbers its
    next writes 2, 3, ... which b would skip. Refused, nothing exchanged; its clone syncs whole."""
    a, b = open_db("a"), open_db("b")
    topic(a, "t1")
    backup = tmp_path / "a-backup.db"
    a.connection.execute("VACUUM INTO ?", (str(backup),)).fetchall()  # not inside a read transaction
    topic(a, "t2")
    topic(a, "t3")
    Peer(b).sync_with(Peer(a))
    assert {m.site_id: m.received for m in watermarks(b)} == {a.site_id: 3}
    a.close()
    backup.replace(tmp_path / "a.db")
    restored = open_db("a")
    assert (restored.site_id, restored.db_version) == (a.site_id, 1)
    topic(restored, "t4")
    before = state(b)
    with pytest.raises(DuplicateSiteError, match="crdt-sync clone"):
        Peer(b).sync_with(Peer(restored))
    with pytest.raises(DuplicateSiteError, match="crdt-sync clone"):
        Peer(restored).sync_with(Peer(b))
    assert state(b) == before and {m.site_id: m.received for m in watermarks(b)} == {a.site_id: 3}
    new_site = restored.clone_to(tmp_path / "a-clone.db")
    clone = open_db("a-clone")
    assert clone.site_id == new_site != a.site_id
    assert state(clone) == state(restored)
    result = Peer(clone).sync_with(Peer(b))
    assert result.pushed == 6  # t1 again (known to b) and t4, still attributed to a's site
    assert [row[0] for row in state(b)] == ["t1", "t2", "t3", "t4"]
    assert state(clone) == state(b)
    with b.reading() as s:
        sites = {row[0].hex() for row in s.execute("SELECT site_id FROM crsql_changes")}
    assert sites == {a.site_id}  # the clone's inherited changes keep their origin


NUMBER_LIKE_TEXTS = ["00", "0", "1e3", " 5", "0x10", "-0", "1.50", "9223372036854775808", "+7"]


@pytest.mark.parametrize("path", ["file", ":memory:"])
@pytest.mark.parametrize("page_changes", [10_000, 8], ids=["one-page", "in-parts"])
def test_text_that_looks_like_a_number_crosses_unchanged(open_db, tmp_path, path, page_changes):
    """Found by the property test: a group sent in parts from a snapshot table declared by
    `CREATE TABLE AS SELECT` gave `val` NUMERIC affinity, and '00' arrived as '0'."""
    a = open_db("a") if path == "file" else Database.open(":memory:")
    b = open_db("b")
    try:
        with a.transaction() as tx:
            for i, text in enumerate(NUMBER_LIKE_TEXTS):
                tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)", (f"t{i}", text))
        limits = Limits(page_changes=page_changes)
        Peer(b, limits=limits).sync_with(Peer(a, limits=limits))
        with b.reading() as s:
            got = s.execute("SELECT name, typeof(name) FROM topics ORDER BY id")
        assert sorted(got) == sorted((text, "text") for text in NUMBER_LIKE_TEXTS)
        export_to = tmp_path / f"{path.strip(':')}-{page_changes}.bin"
        c = open_db(f"c-{path.strip(':')}-{page_changes}")
        export_changes(a, export_to, limits=limits)
        import_changes(c, export_to)
        assert state(c) == state(b)
    finally:
        if path != "file":
            a.close()
