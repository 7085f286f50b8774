"""Property: whatever the writes, partial syncs, lost/duplicated/reordered messages, cut
connections and restarts, a final full sync leaves every CRR table identical everywhere.

3-5 replicas on the real schema; writes are raw SQL on the CRR tables (sync must not
depend on the stores). Messages go through `Channel`, encoded and decoded as on a wire.
The default run is short; SYNC_PROPERTY_EXAMPLES=200 raises the example count.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Database, ManualClock
from sync import Peer, ProtocolError
from sync.changes import Limits, ensure_tables, watermarks
from test_sync_support import Channel, crr_state

EXAMPLES = int(os.environ.get("SYNC_PROPERTY_EXAMPLES", "10"))
KEYS = [f"k{i}" for i in range(6)]

writes = st.tuples(
    st.just("write"),
    st.integers(0, 4),  # replica (modulo the replica count)
    st.sampled_from(["insert", "update", "delete", "bulk"]),
    st.sampled_from(["topics", "events"]),
    st.sampled_from(KEYS),
    st.one_of(st.text(max_size=8), st.integers(-5, 5), st.binary(max_size=4)),
)
syncs = st.tuples(
    st.just("sync"),
    st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 2**32),           # channel seed
    st.sampled_from([0.0, 0.1, 0.3]),  # loss
    st.sampled_from([0.0, 0.2]),       # duplication
    st.sampled_from([0.0, 0.3]),       # reordering
    st.one_of(st.none(), st.integers(1, 30)),  # cut the connection after this many deliveries
)
reopens = st.tuples(st.just("reopen"), st.integers(0, 4))
operations = st.lists(st.one_of(writes, writes, syncs, syncs, reopens), min_size=4, max_size=30)

LIMITS = Limits(page_changes=8)  # small pages: multi-page rounds and split transactions


def apply_write(db: Database, kind: str, table: str, key: str, value) -> None:
    column = "name" if table == "topics" else "title"
    with db.transaction() as tx:
        if kind == "insert":
            tx.execute(f"INSERT INTO {table} (id, {column}) VALUES (?, ?) "
                       f"ON CONFLICT (id) DO UPDATE SET {column} = excluded.{column}", (key, value))
        elif kind == "update":
            tx.execute(f"UPDATE {table} SET {column} = ? WHERE id = ?", (value, key))
        elif kind == "delete":
            tx.execute(f"DELETE FROM {table} WHERE id = ?", (key,))
        else:  # one transaction bigger than a page: goes as parts
            for suffix in range(4):
                tx.execute(f"INSERT OR REPLACE INTO {table} (id, {column}) VALUES (?, ?)", (f"{key}-{suffix}", value))


def lossy_sync(client_db: Database, server_db: Database, seed, loss, dup, reorder, cut) -> None:
    client = Peer(client_db, limits=LIMITS).session("client")
    server = Peer(server_db, limits=LIMITS).session("server")
    link = Channel(client, server, rng=random.Random(seed), loss=loss, dup=dup, reorder=reorder,
                   max_deliveries=cut)
    try:
        link.run()
    finally:
        client.close()
        server.close()
    for session in (client, server):
        if session.error is not None:  # only the channel's doing may fail a round, never a merge
            assert isinstance(session.error, ProtocolError), session.error
            assert "gap" not in str(session.error) and "vanished" not in str(session.error)


def check_bookkeeping(dbs: list[Database]) -> None:
    versions = {db.site_id: db.db_version for db in dbs}
    for db in dbs:
        ensure_tables(db)  # a replica that never synced yet has none
        with db.reading() as s:
            assert s.scalar("SELECT count(*) FROM __sync_staging") == 0
        for mark in watermarks(db):
            assert mark.received <= versions[mark.site_id]


def full_sync(dbs: list[Database]) -> int:
    applied = 0
    for i, client in enumerate(dbs):
        for j, server in enumerate(dbs):
            if i != j:
                applied += Peer(client).sync_with(Peer(server)).applied
    return applied


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(3, 5), ops=operations)
def test_replicas_converge_after_any_history(count, ops):
    clock = ManualClock(1_700_000_000_000)
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"r{i}.db" for i in range(count)]
        dbs = [Database.open(p, clock=clock) for p in paths]
        try:
            for op in ops:
                clock.advance(1)
                if op[0] == "write":
                    _, who, kind, table, key, value = op
                    apply_write(dbs[who % count], kind, table, key, value)
                elif op[0] == "sync":
                    _, a, b, seed, loss, dup, reorder, cut = op
                    if a % count != b % count:
                        lossy_sync(dbs[a % count], dbs[b % count], seed, loss, dup, reorder, cut)
                        check_bookkeeping(dbs)
                else:
                    who = op[1] % count
                    dbs[who].close()
                    dbs[who] = Database.open(paths[who], clock=clock)
            full_sync(dbs)
            full_sync(dbs)
            first = crr_state(dbs[0])
            for db in dbs[1:]:
                assert crr_state(db) == first
            assert full_sync(dbs) == 0  # converged: nothing left takes effect anywhere
        finally:
            for db in dbs:
                db.close()
