"""Helpers shared by the sync tests (imported as `test_sync_support`), and their own checks.

Everything runs on the real migrations and the real extension; writes are raw SQL on the
CRR tables because sync must not depend on the stores.
"""

from __future__ import annotations

import random
from collections import deque

from engine import Database
from engine.migrations import crr_tables
from sync import Peer
from sync.protocol import Changes, decode
from sync.session import Session

__all__ = ["state", "crr_state", "write", "topic", "Channel", "run_round", "pages_of"]


def write(db: Database, sql: str, params: tuple = ()) -> None:
    """One statement in its own transaction."""
    with db.transaction() as tx:
        tx.execute(sql, params)


def topic(db: Database, id: str, name: str = "", workflow_id: str = "wf") -> None:
    write(db, "INSERT INTO topics (id, workflow_id, name) VALUES (?, ?, ?)", (id, workflow_id, name))


def state(db: Database, table: str = "topics") -> list[tuple]:
    with db.reading() as s:
        return s.execute(f'SELECT * FROM "{table}" ORDER BY 1')


def crr_state(db: Database) -> dict[str, list[tuple]]:
    """Every CRR table's rows, ordered by primary key."""
    with db.reading() as s:
        return {t: s.execute(f'SELECT * FROM "{t}" ORDER BY 1') for t in crr_tables(s.connection)}


def pages_of(messages: list[bytes]) -> list[Changes]:
    return [m for m in map(decode, messages) if isinstance(m, Changes)]


class Channel:
    """An in-process link between a client and a server session that can lose, duplicate
    and reorder messages (driven by a seeded random generator), or stop after a number
    of deliveries. Records every message it delivers."""

    def __init__(self, client: Session, server: Session, *, rng: random.Random | None = None,
                 loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0, max_deliveries: int | None = None):
        self.client, self.server = client, server
        self.rng = rng or random.Random(0)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.max_deliveries = max_deliveries
        self.delivered: list[tuple[str, bytes]] = []  # (direction "c2s"/"s2c", bytes)
        self.queue: deque[tuple[Session, bytes]] = deque()

    def send(self, to: Session, messages: list[bytes]) -> None:
        for data in messages:
            if self.rng.random() < self.loss:
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                if self.queue and self.rng.random() < self.reorder:
                    self.queue.insert(self.rng.randrange(len(self.queue)), (to, data))
                else:
                    self.queue.append((to, data))

    def run(self) -> None:
        """Deliver until the queue is empty, the delivery budget is spent, or a side stops."""
        self.send(self.server, self.client.start())
        while self.queue:
            if self.max_deliveries is not None and len(self.delivered) >= self.max_deliveries:
                return
            to, data = self.queue.popleft()
            self.delivered.append(("c2s" if to is self.server else "s2c", data))
            other = self.client if to is self.server else self.server
            self.send(other, to.receive(data))

    def pages(self, direction: str) -> list[Changes]:
        return pages_of([data for d, data in self.delivered if d == direction])


def run_round(client_peer: Peer, server_peer: Peer, *, token: str | None = None, **channel) -> Channel:
    """One round through a Channel; both sessions are closed afterwards."""
    client = client_peer.session("client", token=token)
    server = server_peer.session("server")
    link = Channel(client, server, **channel)
    try:
        link.run()
    finally:
        client.close()
        server.close()
    return link


def test_channel_delivers_a_clean_round(open_db):
    a, b = open_db("a"), open_db("b")
    topic(a, "t1", "one")
    link = run_round(Peer(b), Peer(a))
    assert link.client.finished and not link.client.failed
    assert [len(p.rows) for p in link.pages("s2c")] == [3]
    assert state(b) == state(a) == [("t1", "wf", "one", 0)]


def test_channel_can_stop_mid_round(open_db):
    a, b = open_db("a"), open_db("b")
    topic(a, "t1")
    link = run_round(Peer(b), Peer(a), max_deliveries=2)
    assert not link.client.finished
    assert state(b) == []
