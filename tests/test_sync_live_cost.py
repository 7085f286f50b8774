"""What a live write and a paged round cost on the wire and in reads (perf findings 1 and 4).

A live write is one page and one ack per link: the receiver's Ack carries `covered` instead
of an empty page sent back. A page cut at a group boundary keeps the whole last group and
starts the next page with it instead of reading it again."""

from __future__ import annotations

import pytest

from sync import Peer, State
from sync.session import ACKS_PER_RECORD
from sync.changes import Limits
from sync.outbox import Outbox
from sync.watermarks import ensure_tables, watermarks
from sync.protocol import Ack, Changes, decode
from sync.testing import assert_converged
from test_sync_pages import bulk_insert
from test_sync_support import state, topic, write


def _live_pair(cluster):
    link = cluster.connect(1, 0, live=True)
    link.deliver()
    assert link.client.state is State.LIVE and link.server.state is State.LIVE
    return link


def _since(link, start: int) -> list:
    return [decode(m.data) for m in link.messages[start:] if m.delivered]


@pytest.mark.cluster(n=2)
def test_a_live_write_costs_one_page_and_one_ack_per_direction(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    link = _live_pair(cluster)
    for k in range(5):
        for db, name in ((a, "a"), (b, "b")):
            start = len(link.messages)
            topic(db, f"{name}{k}")
            link.notify()
            link.notify()  # a second notification finds nothing to send (no echo page)
            messages = _since(link, start)
            assert [type(m) for m in messages] == [Changes, Ack], messages
            assert len(messages[0].rows) == 3 and messages[1].covered > 0
    assert state(a) == state(b) and len(state(a)) == 10
    link.close()
    # the claims moved the watermarks as empty pages would have: a new round moves nothing
    ra, rb = ({m.site_id: m for m in watermarks(db)} for db in (a, b))
    assert ra[b.site_id].received == b.db_version and rb[a.site_id].received == a.db_version
    rnd = cluster.sync(1, 0)
    assert rnd.moved == 0 and [len(p.rows) for p in rnd.pages()] == [0, 0]


@pytest.mark.cluster(n=3)
def test_a_relayed_live_write_is_not_echoed_and_re_sync_moves_nothing(cluster):
    a, b, c = cluster.replica(0), cluster.replica(1), cluster.replica(2)
    links = [cluster.connect(i, 0, live=True) for i in (1, 2)]  # a is the hub
    for link in links:
        link.deliver()
    start = [len(link.messages) for link in links]
    for k in range(4):
        topic(b, f"b{k}")
        for _ in range(3):
            for link in links:
                link.notify()
    assert state(a) == state(b) == state(c) and len(state(a)) == 4
    for link, first in zip(links, start):
        kinds = [(type(m).__name__, len(getattr(m, "rows", ()))) for m in _since(link, first)]
        assert kinds == [("Changes", 3), ("Ack", 0)] * 4, kinds  # no empty pages back and forth
        link.close()
    for client in (1, 2):
        assert cluster.sync(client, 0).moved == 0


@pytest.mark.cluster(n=2)
def test_a_merge_listener_that_writes_nothing_keeps_the_claim(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    cluster.replica(1).on_merge(lambda tx, merged: tx.execute("SELECT count(*) FROM topics"))
    link = _live_pair(cluster)
    start = len(link.messages)
    topic(a, "t")
    link.notify()
    link.notify()
    messages = _since(link, start)
    assert [type(m) for m in messages] == [Changes, Ack] and messages[1].covered == b.db_version
    link.close()
    assert cluster.sync(1, 0).moved == 0


@pytest.mark.cluster(n=2)
def test_a_merge_whose_listener_writes_still_sends_its_watermark_page(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    cluster.replica(1).on_merge(  # a local write at the merge's version: a must get it, no claim
        lambda tx, merged: tx.execute("INSERT OR IGNORE INTO topics (id, workflow_id, name) VALUES ('hook', 'wf', '')"))
    link = _live_pair(cluster)
    start = len(link.messages)
    topic(a, "t")
    link.notify()
    link.notify()  # b's merge moved its db_version: it sends the empty page as before
    messages = _since(link, start)
    assert [type(m) for m in messages] == [Changes, Ack, Changes, Ack]
    assert messages[1].covered == 0 and len(messages[2].rows) == 3  # the hook's row goes to a
    topic(a, "t2")  # the hook's INSERT OR IGNORE now writes nothing: a claim again
    link.notify()
    link.notify()
    assert [type(m) for m in _since(link, start + 4)] == [Changes, Ack]
    link.close()
    assert state(a) == state(b)
    assert cluster.sync(1, 0).moved == 0


@pytest.mark.cluster(n=2)
def test_one_shot_rounds_make_no_claims(cluster):
    a, b = cluster.replica(0), cluster.replica(1)
    topic(a, "from-a")
    topic(b, "from-b")
    rnd = cluster.sync(1, 0)
    acks = [decode(m.data) for m in rnd.messages if m.kind == "ack"]
    assert acks and all(ack.covered == 0 for ack in acks)
    assert cluster.sync(1, 0).moved == 0
    assert state(a) == state(b)


def _read_all(db, limits: Limits) -> tuple[list[Changes], int]:
    ensure_tables(db)
    outbox = Outbox(db, "0" * 32, 0, limits)
    pages = []
    while (page := outbox.next_page(marker=False)) is not None:
        pages.append(page)
        outbox.acknowledged(page.upto)
    return pages, outbox.rows_read


def test_a_cut_group_is_carried_into_the_next_page_not_read_again(open_db):
    a = open_db("a")
    for k in range(30):
        bulk_insert(a, 1 + k % 4, prefix=f"k{k}-")  # groups of 3..12 changes
    total = 3 * sum(1 + k % 4 for k in range(30))
    pages, read = _read_all(a, Limits(page_changes=20))
    assert all(len(p.rows) <= 21 for p in pages) and len(pages) >= 8
    for before, after in zip(pages, pages[1:]):
        assert max(r[5] for r in before.rows) <= before.upto == after.since < min(r[5] for r in after.rows)
    assert sum(len(p.rows) for p in pages) == total
    # at most the first row of the following group is read twice per page
    assert read <= total + len(pages)


def test_a_group_too_large_to_carry_still_goes_in_parts(open_db):
    a, b = open_db("a"), open_db("b")
    topic(a, "first")
    bulk_insert(a, 100)  # 300 changes in one transaction after a small one
    topic(a, "last")
    limits = Limits(page_changes=50)
    pages, _ = _read_all(a, limits)
    parts = [p for p in pages if p.more_parts or p.part]
    assert len(parts) == 6 and sum(len(p.rows) for p in parts) == 300
    assert sum(len(p.rows) for p in pages) == 306
    Peer(b, limits=limits).sync_with(Peer(a, limits=limits))
    assert_converged([a, b])


def test_a_carried_group_is_sent_even_when_nothing_newer_exists(open_db):
    a = open_db("a")
    bulk_insert(a, 5, prefix="x")   # 15 changes
    bulk_insert(a, 4, prefix="y")   # 12 changes: cut off by the bound, carried
    pages, read = _read_all(a, Limits(page_changes=20))
    assert [len(p.rows) for p in pages] == [15, 12] and pages[-1].caught_up
    assert read == 27
    write(a, "UPDATE topics SET name = 'z' WHERE id = 'x0'")  # x0.name moves from the first group to a new one
    assert [len(p.rows) for p in _read_all(a, Limits(page_changes=20))[0]] == [14, 13]


def test_reading_pages_gives_the_reader_back_to_the_pool(open_db):
    """A live sender checks for new commits often: its read must not cost a new connection."""
    a = open_db("a")
    ensure_tables(a)
    topic(a, "t1")
    outbox = Outbox(a, "0" * 32, 0, Limits())
    with a.borrow_reader() as reader:
        pooled = reader.connection
    assert len(outbox.next_page(marker=False).rows) == 3  # something new
    assert outbox.next_page(marker=False) is None  # nothing new
    outbox.acknowledged(a.db_version)
    assert outbox.next_page(marker=False) is None
    with a.borrow_reader() as reader:
        assert reader.connection is pooled and not pooled.in_transaction


@pytest.mark.cluster(n=2)
def test_live_acks_are_stored_in_batches_and_when_the_link_closes(cluster):
    """In live mode an ack costs no write transaction: acks are stored every ACKS_PER_RECORD
    and when the session closes (what the peer holds is stored with every merge regardless)."""
    a, b = cluster.replica(0), cluster.replica(1)
    link = _live_pair(cluster)  # b is the client, a the server
    acked = lambda: {m.site_id: m.acked for m in watermarks(a)}.get(b.site_id, 0)  # noqa: E731
    stored = acked()
    for k in range(3):
        topic(a, f"a{k}")
        link.notify()
    assert len(state(b)) == 3 and acked() == stored  # three acks, held by a's session
    for k in range(3, 3 + ACKS_PER_RECORD):
        topic(a, f"a{k}")
        link.notify()
    assert stored < acked() < a.db_version  # a batch was stored
    link.close()
    assert acked() == a.db_version
