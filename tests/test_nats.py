"""Replicas on NATS JetStream (sync.nats) against a real `nats-server -js` on a loopback port.

Every test starts its own server (tmp store, free port) and always stops it. A missing binary
fails the tests (`make test` installs it); set CRDT_SKIP_NATS_TESTS=1 to skip them instead on a
machine without it. Waits poll conditions read from the replicas' own bookkeeping, with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import shutil

import msgspec
import nats
import nats.js.errors
import pytest

import sync
from engine import Database
from sync.changes import CrrSchema, Limits
from sync.cli import main, write_status
from sync.errors import (
    DuplicateSiteError,
    InvalidChangeError,
    MessageTooLargeError,
    ProtocolError,
    SchemaMismatchError,
    StreamGapError,
    TransportError,
    UntrustedServerError,
)
from sync.identity import Identity, load_identity
from sync.nats import NatsOptions, bucket_name, consumer_name, replicate, stream_name, subject_for
from sync.nats.bootstrap import Checkpoint
from sync.nats.positions import origin_watermark, read_positions
from sync.nats.receiving import Step, StreamInbox
from sync.outbox import Outbox
from sync.protocol import Changes, encode
from sync.testing import assert_converged
from sync.testing.nats_server import LocalNatsServer, find_nats_server, free_port
from sync.tls import client_context, server_context, write_self_signed
from sync.trust import trust_peer
from sync.watermarks import ensure_tables, peer_record, stream_key

ROOT = Path(__file__).resolve().parent.parent
NAME = "app"
STREAM = stream_name(NAME)
FAST = NatsOptions(connect_timeout=1.0, reconnect_wait=0.05, api_timeout=3.0, checkpoint_interval=0.1,
                   idle_check=0.2)
SKIP_ENV = "CRDT_SKIP_NATS_TESTS"


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_sync_threads_left():
    """Every replica, notifier and server thread a test starts must be gone after it."""
    yield
    deadline = time.monotonic() + 10
    while left := [t for t in threading.enumerate() if t.name.startswith("sync-")]:
        if time.monotonic() > deadline:
            frames = sys._current_frames()
            stacks = "\n".join(f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
                               for t in left if t.ident in frames)
            raise AssertionError(f"threads still running after the test:\n{stacks}")
        time.sleep(0.01)  # sleep-ok: threads end right after their close() returns


def _need_server() -> None:
    if find_nats_server() is None:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"nats-server is not installed and {SKIP_ENV}=1")
        pytest.fail("nats-server is not installed: `make test` installs it (tools/install-nats-server.sh); "
                    f"set {SKIP_ENV}=1 to skip these tests instead")


@pytest.fixture
def server(tmp_path):
    _need_server()
    with LocalNatsServer(tmp_path / "nats") as running:
        yield running


@pytest.fixture
def start(open_db):
    """start(db, server_or_url, **kwargs): a started replica on the stream `app`; all closed at
    teardown, before the databases."""
    started: list[sync.nats.NatsReplica] = []

    def factory(db: Database, target, **kwargs) -> sync.nats.NatsReplica:
        kwargs.setdefault("options", FAST)
        replica = replicate(db, getattr(target, "url", target), name=NAME, **kwargs)
        started.append(replica)
        return replica

    yield factory
    for replica in started:
        replica.close()


# -- helpers -------------------------------------------------------------------------------


def add_topics(db: Database, prefix: str, count: int = 1) -> list[str]:
    """`count` topic rows, one transaction each (one db_version group each)."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    for i, topic in enumerate(ids):
        with db.transaction() as tx:
            tx.execute("INSERT INTO topics (id, workflow_id, name, created_at) VALUES (?, 'wf', ?, ?)",
                       (topic, f"{prefix} #{i}", i))
    return ids


def add_topics_in_one_transaction(db: Database, prefix: str, count: int) -> None:
    with db.transaction() as tx:
        tx.executemany("INSERT INTO topics (id, workflow_id, name, created_at) VALUES (?, 'wf', ?, ?)",
                       ((f"{prefix}-{i}", f"{prefix} #{i}", i) for i in range(count)))


def topic_ids(db: Database, prefix: str = "") -> set[str]:
    with db.reading() as s:
        return {row[0] for row in s.execute("SELECT id FROM topics WHERE id LIKE ?", (prefix + "%",))}


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # sleep-ok: waiting for network events, bounded by the deadline


def last_own_version(db: Database) -> int:
    with db.reading() as s:
        return s.scalar("SELECT coalesce(max(db_version), 0) FROM crsql_changes WHERE site_id = crsql_site_id()")


def published(db: Database) -> int:
    return read_positions(db, STREAM)[0]


def quiet(dbs: list[Database]) -> bool:
    """Every replica published all its own changes and holds everyone else's published ones."""
    marks = {}
    for db in dbs:
        marks[db.site_id] = published(db)
        if marks[db.site_id] < last_own_version(db):
            return False
    return all(origin_watermark(db, other.site_id) >= marks[other.site_id]
               for db in dbs for other in dbs if other is not db)


def wait_converged(dbs: list[Database], timeout: float = 30.0) -> None:
    wait_until(lambda: quiet(dbs), timeout, "every replica to publish and merge everything")
    assert_converged(dbs)


def in_nats(url: str, work):
    """Run `await work(nc, js)` on a fresh connection of the test itself; returns its result."""
    async def run():
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            return await work(nc, nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(run())


def stream_state(url: str):
    async def work(nc, js):
        return (await js.stream_info(STREAM)).state
    return in_nats(url, work)


def resume_of(db: Database) -> int:
    return read_positions(db, STREAM)[1]


class TcpProxy:
    """A loopback TCP relay to a server port that a test can cut (a partition) and heal."""

    def __init__(self, target_port: int, *, delay: float = 0.0):
        self.target = target_port
        self.delay = delay  # seconds before each forwarded chunk: a slow link
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.heal()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def heal(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        self._spawn(self._accept, listener)

    def cut(self) -> None:
        """Close the listener and every relayed connection: nothing gets through until heal()."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [listener, *sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):  # already disconnected
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name="test-proxy", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)  # sleep-ok: simulating a slow link
                sink.sendall(data)
        except OSError:
            return  # the proxy was cut: the link is gone, which is the point
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):  # already disconnected
                    sock.shutdown(socket.SHUT_RDWR)


# -- the building block --------------------------------------------------------------------


def test_own_changes_outbox_leaves_out_merged_changes(open_db):
    a, b = open_db("a"), open_db("b")
    add_topics(a, "a", 2)
    add_topics(b, "b", 3)
    sync.Peer(b).sync_with(sync.Peer(a))
    ensure_tables(b)
    outbox = Outbox.own_changes(b, 0, Limits())
    rows = []
    while (page := outbox.next_page(marker=False)) is not None and page.rows:
        rows += page.rows
        outbox.acknowledged(page.upto)
    outbox.close()
    assert {row[6] for row in rows} == {bytes.fromhex(b.site_id)}
    assert len(rows) == 3 * 3  # three topics of b, three changes each (a's were merged, not sent)


def test_own_changes_outbox_passes_over_merged_versions_only(open_db):
    a, b = open_db("a"), open_db("b")
    add_topics(a, "a", 2)
    ensure_tables(b)
    outbox = Outbox.own_changes(b, 0, Limits())
    assert outbox.next_page(marker=False) is None  # nothing of its own yet
    before = b.db_version
    sync.Peer(b).sync_with(sync.Peer(a))  # versions of a's changes only
    outbox.pass_over(before, b.db_version)
    assert outbox.scanned == b.db_version
    outbox.pass_over(b.db_version + 5, b.db_version + 9)  # not contiguous with what was read: ignored
    assert outbox.scanned == b.db_version
    add_topics(b, "b", 1)
    page = outbox.next_page(marker=False)
    assert {row[6] for row in page.rows} == {bytes.fromhex(b.site_id)} and len(page.rows) == 3
    outbox.close()


# -- fleets --------------------------------------------------------------------------------


def test_what_a_merge_listener_writes_during_a_merge_is_published(server, open_db, start):
    """A merge listener's writes share the merge's versions (the engine's audit writes repairs
    so): the publisher must not pass over those versions."""
    a, b = open_db("a"), open_db("b")

    def answer(tx, merged):
        for table, key in merged:
            if table == "topics" and key[0].startswith("ask-"):
                tx.execute("INSERT OR IGNORE INTO topics (id, name) VALUES (?, 'answer')", ("answer-" + key[0],))

    b.on_merge(answer)
    start(a, server)
    start(b, server)
    add_topics(a, "ask", 3)
    wait_until(lambda: len(topic_ids(a, "answer-")) == 3, what="b's answers, written while merging, to reach a")
    wait_converged([a, b])


def test_five_replicas_converge_with_one_stream_and_a_durable_consumer_each(server, open_db, start):
    dbs = [open_db(f"r{i}") for i in range(5)]
    replicas = [start(db, server) for db in dbs]
    for replica in replicas:
        replica.wait_connected(10)
    for i, db in enumerate(dbs):
        add_topics(db, f"r{i}", 10)
    wait_converged(dbs)
    for i, db in enumerate(dbs):  # concurrent updates of one row, and a delete
        with db.transaction() as tx:
            tx.execute("UPDATE topics SET name = ? WHERE id = 'r0-0'", (f"renamed by r{i}",))
    with dbs[1].transaction() as tx:
        tx.execute("DELETE FROM topics WHERE id = 'r1-9'")
    wait_converged(dbs)
    assert topic_ids(dbs[3]) == {f"r{i}-{j}" for i in range(5) for j in range(10)} - {"r1-9"}

    async def layout(nc, js):
        info = await js.stream_info(STREAM)
        return info.config.subjects, sorted([c.name for c in await js.consumers_info(STREAM)])

    subjects, consumers = in_nats(server.url, layout)
    assert subjects == [f"crdt.{NAME}.>"]
    assert consumers == sorted(consumer_name(db.site_id) for db in dbs)
    assert all(not r.refusals and r.error is None and r.counts["bootstraps"] == 0 for r in replicas)


def test_restarts_in_the_middle_of_a_split_group(server, open_db, start, caplog):
    """A group goes as 300 parts over a slow link that is cut part-way: the reader restarts
    with parts held (it re-reads them from its resume point), then the writer restarts and
    publishes the group again from part 0 (the reader starts the group over)."""
    caplog.set_level(logging.INFO, logger="sync.nats")
    writer, reader = open_db("w"), open_db("r")
    slow_link = TcpProxy(server.port, delay=0.005)
    try:
        first_writer = start(writer, slow_link, limits=Limits(page_changes=10))
        first_reader = start(reader, server)
        first_reader.wait_connected(10)
        add_topics_in_one_transaction(writer, "big", 1000)  # 3000 changes
        wait_until(lambda: first_reader.counts["parts_taken"] >= 20, what="the reader to take a few parts")
        slow_link.cut()
        first_reader.close()
        assert topic_ids(reader, "big") == set()  # held, not merged
        assert resume_of(reader) <= stream_state(server.url).first_seq + 1  # back to part 0
        reader.close()
        reopened = open_db("r")
        second_reader = start(reopened, server)
        second_reader.wait_connected(10)
        wait_until(lambda: second_reader.counts["parts_taken"] >= 20, what="the parts to be taken again")
        first_writer.close()  # its group never got past the cut
        start(writer, server, limits=Limits(page_changes=10))
        wait_converged([writer, reopened], timeout=60)
        assert len(topic_ids(reopened, "big")) == 1000
        assert "published anew while parts of a group were held" in caplog.text
    finally:
        slow_link.close()


def test_partitioned_replica_heals(server, open_db, start):
    a, b, c = open_db("a"), open_db("b"), open_db("c")
    proxy = TcpProxy(server.port)
    try:
        start(a, server)
        start(b, server)
        cut_off = start(c, proxy)
        cut_off.wait_connected(10)
        add_topics(a, "before", 2)
        wait_converged([a, b, c])
        proxy.cut()
        wait_until(lambda: not cut_off.connected, what="the partitioned replica to notice")
        add_topics(a, "during-a", 3)
        add_topics(c, "during-c", 3)
        wait_converged([a, b])
        assert topic_ids(c, "during-a") == set() and topic_ids(a, "during-c") == set()
        proxy.heal()
        wait_converged([a, b, c])
        assert len(topic_ids(b, "during-c")) == 3
    finally:
        proxy.close()


def test_a_replica_started_before_the_server_connects_when_it_comes_up(tmp_path, open_db, start):
    _need_server()
    server = LocalNatsServer(tmp_path / "later")  # not started yet
    try:
        a, b = open_db("a"), open_db("b")
        early = start(a, server)
        with pytest.raises(TimeoutError):
            early.wait_connected(0.5)
        wait_until(lambda: isinstance(early.error, TransportError), what="the failed attempts to show")
        assert server.url in str(early.error)
        add_topics(a, "offline", 2)
        server.start()
        early.wait_connected(20)
        start(b, server)
        wait_converged([a, b])
    finally:
        server.stop()


def test_server_restart_with_the_same_store(server, open_db, start):
    dbs = [open_db(f"r{i}") for i in range(3)]
    replicas = [start(db, server) for db in dbs]
    for i, db in enumerate(dbs):
        add_topics(db, f"before{i}", 3)
    wait_converged(dbs)
    stored = stream_state(server.url).messages
    server.stop()
    wait_until(lambda: not any(r.connected for r in replicas), what="every replica to lose the server")
    for i, db in enumerate(dbs):
        add_topics(db, f"during{i}", 3)
    server.start()
    wait_converged(dbs)
    assert stream_state(server.url).messages > stored  # the store kept what came before
    assert all(len(topic_ids(db, "during")) == 9 for db in dbs)


def test_a_removed_consumer_or_stream_is_noticed_and_replaced(server, open_db, start):
    a, b = open_db("a"), open_db("b")
    start(a, server)
    watched = start(b, server)
    add_topics(a, "first", 2)
    wait_converged([a, b])
    pins = watched.counts["repins"]

    async def remove_consumer(nc, js):
        await js.delete_consumer(STREAM, consumer_name(b.site_id))

    in_nats(server.url, remove_consumer)  # an operator's mistake
    wait_until(lambda: watched.counts["repins"] > pins, what="the idle check to re-pin")
    add_topics(a, "second", 2)
    wait_converged([a, b])

    async def remove_stream(nc, js):
        await js.delete_stream(STREAM)

    in_nats(server.url, remove_stream)
    add_topics(a, "third", 2)
    add_topics(b, "third-b", 2)
    wait_converged([a, b])
    assert stream_state(server.url).messages >= 2  # created anew, with the pages since


def test_duplicates_delivered_by_jetstream_change_nothing(server, open_db, start):
    dbs = [open_db(f"r{i}") for i in range(3)]
    replicas = [start(db, server) for db in dbs]
    for i, db in enumerate(dbs):
        add_topics(db, f"r{i}", 4)
    with dbs[0].transaction() as tx:
        tx.execute("UPDATE topics SET name = 'changed' WHERE id = 'r1-0'")
    wait_converged(dbs)
    wait_until(lambda: all(r.stats.changes_received == sum(o.stats.changes_sent for o in replicas if o is not r)
                           for r in replicas), what="the counters to catch up with the merges")
    before = [(db.db_version, topic_ids(db)) for db in dbs]
    applied = [r.stats.changes_applied for r in replicas]

    async def republish(nc, js):
        last = (await js.stream_info(STREAM)).state.last_seq
        same_id = None
        for seq in range(1, last + 1):
            message = await js.get_msg(STREAM, seq)
            headers = dict(message.headers)
            same_id = await js.publish(message.subject, message.data, headers=dict(headers))
            headers["Nats-Msg-Id"] = f"copy-{seq}"
            await js.publish(message.subject, message.data, headers=headers)
        return last, same_id

    last, same_id = in_nats(server.url, republish)
    assert same_id.duplicate  # the server itself drops a republished id
    total = stream_state(server.url).last_seq
    assert total == 2 * last
    wait_until(lambda: all(resume_of(db) > total for db in dbs), what="every copy to be read")
    assert [(db.db_version, topic_ids(db)) for db in dbs] == before
    assert [r.stats.changes_applied for r in replicas] == applied

    replicas[1].close()  # read everything again from the first message: all duplicates
    with dbs[1].transaction() as tx:
        tx.execute("UPDATE __sync_nats_positions SET resume = 1")
    again = start(dbs[1], server)
    wait_until(lambda: resume_of(dbs[1]) > total, what="the replica to read the whole stream again")
    assert (dbs[1].db_version, topic_ids(dbs[1])) == before[1]
    assert again.counts["pages_applied"] == 0 and again.stats.changes_applied == 0
    assert_converged(dbs)


def test_huge_transaction_crosses_as_parts_and_lands_whole(server, open_db, start):
    writer, reader = open_db("w"), open_db("r")
    seen: list[int] = []
    reader.on_commit(lambda: seen.append(len(topic_ids(reader, "big"))))
    start(writer, server)
    start(reader, server).wait_connected(10)
    first = stream_state(server.url).last_seq
    add_topics_in_one_transaction(writer, "big", 30_000)
    wait_converged([writer, reader], timeout=120)
    messages = stream_state(server.url).last_seq - first
    assert messages > 1, "30k rows fit one message?"
    assert set(seen) <= {0, 30_000} and 30_000 in seen  # never a part of the transaction alone
    # the reader's versions of that merge hold nothing of its own: its next page still starts
    # where its last published page ended (no gap at the writer)
    add_topics(reader, "after-big", 2)
    wait_converged([writer, reader])


def test_late_joiner_catches_up_from_the_stream(server, open_db, start):
    a, b = open_db("a"), open_db("b")
    start(a, server)
    start(b, server)
    add_topics(a, "a", 5)
    add_topics(b, "b", 5)
    wait_converged([a, b])
    late = open_db("late")
    add_topics(late, "late", 2)  # written before it ever joined
    joined = start(late, server)
    wait_converged([a, b, late])
    assert len(topic_ids(a, "late")) == 2
    assert joined.counts["bootstraps"] == 0


def purge_after_checkpoint(server, a: Database, b: Database) -> None:
    """a and b replicate and converge; once b's checkpoint covers a, the stream is purged (as
    retention would drop it) and a writes more: a newcomer finds a gap in a's pages."""
    start_writes = [(a, "early-a"), (b, "early-b")]
    for db, prefix in start_writes:
        add_topics(db, prefix, 4)
    wait_converged([a, b])

    def checkpoint_of(site: str) -> Checkpoint | None:
        async def work(nc, js):
            try:
                entry = await (await js.key_value(bucket_name(NAME))).get(site)
            except nats.js.errors.KeyNotFoundError:
                return None
            return msgspec.msgpack.decode(entry.value, type=Checkpoint)
        return in_nats(server.url, work)

    def covers_a() -> bool:
        checkpoint = checkpoint_of(b.site_id)
        return checkpoint is not None and checkpoint.origins.get(a.site_id, 0) >= published(a)

    wait_until(covers_a, what="b's checkpoint to cover a")

    async def purge(nc, js):
        await js.purge_stream(STREAM)

    in_nats(server.url, purge)  # retention dropped everything so far
    add_topics(a, "later-a", 2)


def test_bootstrap_from_a_websocket_peer_after_retention(server, open_db, start):
    a, b = open_db("a"), open_db("b")
    start(a, server)
    start(b, server)
    purge_after_checkpoint(server, a, b)
    with sync.serve(b, "127.0.0.1", 0) as peer_server:
        newcomer = start(open_db("new"), server, bootstrap=peer_server.url)
        wait_converged([a, b, newcomer.db])
        assert newcomer.counts["bootstraps"] == 1 and newcomer.error is None

    direct = open_db("direct")  # pulled from a itself: that covers a's purged pages, no gap
    sync.Peer(direct).sync_with(sync.Peer(a))
    joined = start(direct, server)
    add_topics(a, "last-a", 1)
    wait_until(lambda: topic_ids(direct) == topic_ids(a) == topic_ids(b), what="the direct replica to follow a")
    assert_converged([a, b, direct])
    assert joined.counts["bootstraps"] == 0 and not joined.failed

    stranded = start(open_db("stranded"), server)  # no bootstrap peer: stops, applies nothing
    assert stranded.wait_stopped(20)
    assert isinstance(stranded.error, StreamGapError) and stranded.error.origin == a.site_id
    assert "--bootstrap" in str(stranded.error)
    assert topic_ids(stranded.db) == set()
    with pytest.raises(StreamGapError):
        stranded.wait_connected(1)


def test_bootstrap_over_wss_with_keys(server, open_db, start, tmp_path):
    """The bootstrap round meets its peer as `Peer.sync_with` does: TLS with a pinned
    certificate, the peer's key, ours trusted there; a peer proving another key is refused."""
    a, b = open_db("a"), open_db("b")
    start(a, server)
    start(b, server)
    purge_after_checkpoint(server, a, b)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    newcomer, impostor_victim = open_db("new"), open_db("victim")
    for db in (newcomer, impostor_victim):
        trust_peer(b, load_identity(db).public_text, name=db.path, can="read")
    with sync.serve(b, "127.0.0.1", 0, require_keys=True, ssl=server_context(cert, key)) as peer_server:
        assert peer_server.url.startswith("wss://")
        joined = start(newcomer, server, bootstrap=peer_server.url, server_key=load_identity(b).public_text,
                       ssl=client_context(cafile=cert))
        wait_converged([a, b, newcomer])
        assert joined.counts["bootstraps"] == 1 and joined.error is None
        refused = start(impostor_victim, server, bootstrap=peer_server.url, ssl=client_context(cafile=cert),
                        server_key=Identity.generate().public_text)  # expects a key b does not hold
        assert refused.wait_stopped(20)
        assert isinstance(refused.error, UntrustedServerError) and topic_ids(impostor_victim) == set()
    with pytest.raises(ValueError, match="bootstrap"):
        replicate(open_db("x"), server.url, name=NAME, server_key=load_identity(b).public_text)
    with pytest.raises(ValueError, match="wss://"):
        replicate(open_db("y"), server.url, name=NAME, bootstrap="ws://127.0.0.1:1", ssl=client_context())


def copy_after_publishing(server, open_db, start, tmp_path) -> tuple[Database, Database, int]:
    """a publishes two topics and closes; its file is copied; (a reopened, the copy, the
    db_version where they split)."""
    a = open_db("a")
    first = start(a, server)
    add_topics(a, "base", 2)
    wait_until(lambda: published(a) >= last_own_version(a), what="a's base to be published")
    first.close()
    a.close()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    a, copy = open_db("a"), open_db("copy")
    assert copy.site_id == a.site_id and copy.incarnation != a.incarnation
    return a, copy, a.db_version


def test_a_page_on_its_own_subject_from_a_file_it_does_not_continue_is_refused(server, open_db, start, tmp_path):
    a, copy, split = copy_after_publishing(server, open_db, start, tmp_path)
    schema = CrrSchema.load(a)

    def own_page(db: Database, upto: int, incarnation: str):
        inbox = StreamInbox(db, STREAM, schema, Limits(), resume=1)
        return inbox.apply_all([Step(1, a.site_id, Changes(since=0, upto=upto, rows=[]), incarnation)])

    assert own_page(copy, split, a.incarnation).handled == 1  # the original's pages before the split
    assert own_page(a, split + 1, a.incarnation).handled == 1  # its own
    with pytest.raises(DuplicateSiteError, match="crdt-sync clone"):
        own_page(copy, split + 1, a.incarnation)  # the original wrote on after the copy split off
    with pytest.raises(DuplicateSiteError, match="crdt-sync clone"):
        own_page(a, split + 1, copy.incarnation)  # the copy's: not in the original's lineage


def test_two_files_with_one_site_id_on_a_stream_both_stop(server, open_db, start, tmp_path):
    """Each file reads the other's page on its own subject (or finds its consumer, named after
    the site id, taken over by the other) and stops, telling to clone the copy."""
    a, copy, _ = copy_after_publishing(server, open_db, start, tmp_path)
    add_topics(a, "after-a", 2)
    add_topics(copy, "after-copy", 2)
    patient = msgspec.structs.replace(FAST, idle_check=1.0)  # time to publish before a takeover is noticed
    original, copied = start(a, server, options=patient), start(copy, server, options=patient)
    assert original.wait_stopped(20) and copied.wait_stopped(20)
    errors = [original.error, copied.error]
    assert all(isinstance(e, DuplicateSiteError) and "crdt-sync clone" in str(e) for e in errors), errors
    assert any("which this file does not continue" in str(e) for e in errors), errors  # one read the other's page


def test_origins_are_recorded_with_their_incarnation_and_listed_apart_from_peers(server, open_db, start):
    a, b = open_db("a"), open_db("b")
    start(a, server)
    start(b, server)
    add_topics(a, "a", 2)
    wait_converged([a, b])
    assert peer_record(b, stream_key(a.site_id)).incarnation == a.incarnation
    out = io.StringIO()
    write_status(b, out)
    status = out.getvalue()
    assert "known peers:    0" in status and "NATS origins:   1 (positions on a stream, not peers" in status
    assert f"  {a.site_id}  its own changes merged from the stream through its db_version {published(a)}" in status


# -- refusals ------------------------------------------------------------------------------


def test_bad_messages_are_refused_and_the_stream_goes_on(server, open_db, start):
    a, b = open_db("a"), open_db("b")
    start(a, server)
    receiver = start(b, server)
    receiver.wait_connected(10)
    add_topics(a, "a", 1)
    wait_converged([a, b])
    with a.reading() as s:
        rows = [tuple(r) for r in s.execute(
            'SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes')]
    forger = "f" * 32
    schema = {"Crdt-Schema": f"{a.schema_version}:{a.schema_fingerprint}"}
    not_its_own = encode(Changes(since=0, upto=max(r[5] for r in rows), rows=rows))  # a's rows

    async def forge(nc, js):
        await js.publish(subject_for(NAME, forger), b"\x93garbage", headers=schema)
        await js.publish(subject_for(NAME, forger), not_its_own, headers=schema)  # a's rows under another site
        await js.publish(subject_for(NAME, forger), not_its_own)  # no schema header
        await js.publish(f"crdt.{NAME}.not-a-site", not_its_own, headers=schema)

    in_nats(server.url, forge)
    add_topics(a, "after", 2)
    wait_converged([a, b])
    wait_until(lambda: len(receiver.refusals) == 4, what="four refusals")
    kinds = [type(error) for error in receiver.refusals]
    assert kinds.count(InvalidChangeError) == 1 and all(issubclass(k, ProtocolError) for k in kinds)
    assert receiver.error is None and not receiver.failed


def test_a_page_of_another_schema_stops_the_replica(server, open_db, start):
    a = open_db("a")
    replica = start(a, server)
    replica.wait_connected(10)
    page = encode(Changes(since=0, upto=1, rows=[]))

    async def publish(nc, js):
        await js.publish(subject_for(NAME, "e" * 32), page, headers={"Crdt-Schema": "99:0123456789abcdef"})

    in_nats(server.url, publish)
    assert replica.wait_stopped(20)
    assert isinstance(replica.error, SchemaMismatchError)
    assert "migrate" in str(replica.error) and replica.error.remote_version == 99


def test_pages_fit_the_servers_max_payload_and_an_oversized_change_is_refused(tmp_path, open_db, start):
    _need_server()
    with LocalNatsServer(tmp_path / "small", max_payload=64 * 1024) as small:
        writer, reader = open_db("w"), open_db("r")
        publisher = start(writer, small)
        start(reader, small).wait_connected(10)
        first = stream_state(small.url).last_seq
        add_topics_in_one_transaction(writer, "mid", 2000)  # ~200 KB of changes: parts of <= 64 KB
        wait_converged([writer, reader])
        assert stream_state(small.url).last_seq - first >= 4
        with writer.transaction() as tx:
            tx.execute("INSERT INTO topics (id, name) VALUES ('huge', ?)", ("x" * 100_000,))
        assert publisher.wait_stopped(20)
        assert isinstance(publisher.error, MessageTooLargeError)
        assert "max_payload" in str(publisher.error)
        publisher.close()


# -- the command line ----------------------------------------------------------------------


def test_cli_replicates_until_interrupted(server, tmp_path, open_db, start):
    path = tmp_path / "cli.db"
    Database.open(path).close()  # an initialized replica file
    inproc = open_db("inproc")
    start(inproc, server)
    process = subprocess.Popen(
        [sys.executable, "-m", "sync.cli", "nats", str(path), "--server", server.url, "--name", NAME],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        banner = process.stdout.readline()
        assert banner.startswith(f"replicating {path} (site ") and f"stream {STREAM}" in banner, banner
        add_topics(inproc, "from-inproc", 2)
        with Database.open(path) as other_connection:  # a write by another process/connection
            add_topics(other_connection, "from-cli", 2)
            wait_until(lambda: len(topic_ids(other_connection, "from-inproc")) == 2, what="inproc -> cli")
        wait_until(lambda: len(topic_ids(inproc, "from-cli")) == 2, what="cli -> inproc")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stderr.read()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("extra, message", [
    (["--keys"], "apply to the --bootstrap peer"),
    (["--cafile", "c.pem"], "apply to the --bootstrap peer"),
    (["--bootstrap", "ws://127.0.0.1:1", "--cafile", "c.pem"], "apply to wss:// URLs"),
    (["--bootstrap", "wss://127.0.0.1:1", "--no-verify"], "--no-verify needs key authentication"),
])
def test_cli_bootstrap_options_are_checked_before_connecting(capsys, tmp_path, extra, message):
    path = tmp_path / "app.db"
    Database.open(path).close()  # an initialized replica file
    code = main(["nats", str(path), "--server", "nats://127.0.0.1:1", *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("crdt-sync: error: ") and message in err, err


def test_cli_refuses_a_name_that_cannot_name_a_stream(capsys, tmp_path):
    path = tmp_path / "my app.db"
    Database.open(path).close()  # an initialized replica file
    code = main(["nats", str(path), "--server", "nats://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("crdt-sync: error: database name 'my app'") and "--name" in err
