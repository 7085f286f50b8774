"""A transaction larger than a page: sent in parts off one read, merged whole.

Eager sessions merge the parts as they arrive into one transaction held open until the last
part; a transport releases that transaction when the sender goes quiet, and the group still
arrives whole, merged from its spilled parts. In-memory replicas send from a snapshot table.
"""

from __future__ import annotations

import threading
from collections import deque

import websockets.sync.client

import sync
from engine import Database
from sync import Peer
from sync.changes import Limits
from sync.protocol import Changes, decode
from sync.session import Role
from test_sync_pages import bulk_insert
from test_sync_support import state, topic

LIMITS = Limits(page_changes=100)


def _round(client, server):
    """The messages of a round, delivered one at a time: yields (receiver, message) before each
    delivery so that a test can look at the replicas in between."""
    queue = deque((server, data) for data in client.start())
    while queue:
        target, data = queue.popleft()
        yield target, decode(data)
        other = client if target is server else server
        queue.extend((other, reply) for reply in target.receive(data))


def _state_from_another_thread(db) -> list[tuple]:
    """What other connections see (this thread's reads would go through its open transaction)."""
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(state(db)))
    reader.start()
    reader.join(10)
    return seen[0]


def _group_versions(db, prefix: str) -> list[tuple]:
    with db.reading() as s:
        return s.execute("SELECT DISTINCT db_version FROM crsql_changes WHERE pk IN "
                         "(SELECT pk FROM crsql_changes WHERE cid = 'name' AND val LIKE ?)", (prefix + "%",))


def test_an_eager_merge_holds_one_transaction_until_the_last_part(open_db):
    a, b = open_db("a"), open_db("b")
    bulk_insert(a, 300, name="g")  # 900 changes: 9 parts
    client = Peer(b, limits=LIMITS).session(Role.CLIENT, streaming=True)
    server = Peer(a, limits=LIMITS).session(Role.SERVER)
    held = []
    for target, message in _round(client, server):
        if target is client and isinstance(message, Changes) and message.part:
            held.append(client.holding_merge)
            assert b.connection.in_transaction  # merged, not committed: invisible to others
            assert _state_from_another_thread(b) == []
    client.close()
    server.close()
    assert held == [True] * 8
    assert not client.holding_merge and not b.connection.in_transaction
    assert state(b) == state(a) and len(_group_versions(b, "g")) == 1


def test_a_released_merge_lets_writers_in_and_the_group_still_arrives_whole(open_db):
    a, b = open_db("a"), open_db("b")
    bulk_insert(a, 300, name="g")
    client = Peer(b, limits=LIMITS).session(Role.CLIENT, streaming=True)
    server = Peer(a, limits=LIMITS).session(Role.SERVER)
    for target, message in _round(client, server):
        if target is client and isinstance(message, Changes) and message.part == 4:
            assert client.holding_merge
            assert client.release_merge() == []
            assert not client.holding_merge and not b.connection.in_transaction
            writer = threading.Thread(target=topic, args=(b, "local", "written meanwhile"))
            writer.start()
            writer.join(10)
            assert not writer.is_alive()  # the write lock is free while the group waits
    client.close()
    server.close()
    assert client.error is None and client.result.pulled == 900
    assert state(b) == state(a) and len(state(b)) == 301  # the local write went back in the push
    assert len(_group_versions(b, "g")) == 1  # still one transaction


def test_a_quiet_peer_mid_group_is_released_by_the_websocket_transport(open_db):
    """The server merges a pushed group eagerly; the client stalls before the last part; the
    server's transport releases the merge after `merge_patience`, so a local write goes through
    while the client is quiet, and the group still arrives whole."""
    hub, pusher = open_db("hub"), open_db("pusher")
    bulk_insert(pusher, 300, name="g")
    server = sync.serve(hub, peer=Peer(hub, limits=Limits(page_changes=100, merge_patience=0.05)))
    session = Peer(pusher, limits=LIMITS).session(Role.CLIENT)
    written = []
    try:
        with websockets.sync.client.connect(server.url, max_size=None) as ws:
            outgoing = deque(session.start())
            while not session.finished:
                while outgoing:
                    frame = outgoing.popleft()
                    message = decode(frame)
                    if isinstance(message, Changes) and message.part and not message.more_parts and not written:
                        writer = threading.Thread(target=topic, args=(hub, "local", "written meanwhile"))
                        writer.start()
                        writer.join(10)  # blocks until the server released the merge
                        written.append(not writer.is_alive())
                    ws.send(frame)
                outgoing.extend(session.receive(ws.recv(timeout=10)))
    finally:
        session.close()
        server.close()
    assert written == [True] and session.error is None and session.result.pushed == 900
    assert len(state(hub)) == 301 and len(_group_versions(hub, "g")) == 1


def test_an_in_memory_replica_sends_pages_and_parts_and_receives_groups(open_db):
    memory, disk = Database.open(":memory:"), open_db("disk")
    try:
        for k in range(12):
            bulk_insert(memory, 1 + k % 5, prefix=f"k{k}-", name=f"m{k}-")
        bulk_insert(memory, 200, prefix="big-", name="mg")  # 600 changes: parts
        bulk_insert(disk, 150, prefix="dbig-", name="dg")   # 450 changes the other way
        result = Peer(memory, limits=LIMITS).sync_with(Peer(disk, limits=LIMITS))
        assert (result.pulled, result.pushed) == (450, 600 + 3 * sum(1 + k % 5 for k in range(12)))
        assert state(memory) == state(disk)
        assert len(_group_versions(disk, "mg")) == 1 and len(_group_versions(memory, "dg")) == 1
        again = Peer(memory, limits=LIMITS).sync_with(Peer(disk, limits=LIMITS))
        assert (again.pulled, again.pushed) == (0, 0)
    finally:
        memory.close()


def test_a_streaming_sender_keeps_a_window_of_pages_in_flight(open_db):
    a, b = open_db("a"), open_db("b")
    for k in range(30):
        bulk_insert(a, 1 + k % 4, prefix=f"k{k}-")  # groups of 3..12 changes
    bulk_insert(a, 100, prefix="big-")  # and one of 300: parts
    limits = Limits(page_changes=20, window=3)
    client = Peer(b, limits=limits).session(Role.CLIENT, streaming=True)
    server = Peer(a, limits=limits).session(Role.SERVER, streaming=True)
    in_flight, most, pages = 0, 0, []
    for target, message in _round(client, server):
        if isinstance(message, Changes) and target is client:
            pages.append(message)
            in_flight += 1
            most = max(most, in_flight)
        elif type(message).__name__ == "Ack" and target is server:
            in_flight -= 1
    client.close()
    server.close()
    assert most == 3 and client.error is None and server.error is None
    whole = [p for p in pages if not p.part and not p.more_parts]
    for before, after in zip(pages, pages[1:]):  # each page starts where the previous one ended
        if not before.more_parts:
            assert after.since == before.upto
    assert len(whole) > 5 and state(b) == state(a)
