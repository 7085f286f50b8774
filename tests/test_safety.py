"""Safe by default: what a new user gets without configuring anything.

Each test is the reproduction of a problem found on the first release: conflict detection
that had to be installed by hand, copied database files that silently lost writes, reads
that waited behind merges, commits through `db.connection` not pushed live, a server that
kept announcing the schema it started with. (Hostile pages: tests/test_sync_protocol.py.)
"""

from __future__ import annotations

import shutil
import threading

import pytest

from engine import Database, ManualClock
from engine.events import event_id
from engine.topics import topic_id
from sync import DuplicateSiteError, Peer, connect, serve
from sync.cli import main as cli
from sync.watermarks import watermarks
from test_sync_support import state, topic

WAIT = 10.0  # seconds: the most any event below may take on a loaded machine


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.005):  # sleep-ok: bounded polling of another thread's progress
                raise AssertionError(f"timed out waiting for {what}")
    finally:
        deadline.cancel()


# -- 1. conflict detection is on by default --------------------------------------------------


def test_the_readme_sync_records_conflicts_without_any_setup(tmp_path):
    """Two replicas reserve the same event while partitioned, then sync exactly as the README
    shows (Database.open + Peer.sync_with): the conflict is recorded and repaired."""
    clock = ManualClock(1_000)
    a = Database.open(tmp_path / "a.db", clock=clock)
    b = Database.open(tmp_path / "b.db", clock=clock)
    try:
        runs = []
        for db in (a, b):
            db.ownership.claim("wf")
            db.events.publish("wf", "inbox", "m1", {})
            run = db.execution.start_run(script_run_id="s", workflow_id="wf", handler_type="consumer",
                                         handler_name="mailer")
            db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result=None)
            runs.append(run.id)
            clock.advance(1)
        for _ in range(3):
            Peer(a).sync_with(Peer(b))
        m1 = event_id(topic_id("wf", "inbox"), "m1")
        for db in (a, b):
            conflicts = db.conflicts.list()
            assert [(c.kind, c.subjects) for c in conflicts] == [("double_reservation", sorted([m1, *runs]))]
            holder = db.events.get(m1).reserved_by_run_id
            assert holder in runs and [db.handler_runs.get(r).status for r in runs].count("crashed") == 1
    finally:
        a.close()
        b.close()


# -- 4. copied database files ----------------------------------------------------------------


def _write_topics(db: Database, prefix: str, count: int) -> None:
    for i in range(count):
        topic(db, f"{prefix}{i}", prefix)


def test_a_copied_file_is_refused_instead_of_losing_writes_and_its_clone_delivers_all(tmp_path):
    """The reported reproduction: a copy of an app's database shares its site id; the hub
    skipped 50 of the copy's 80 writes with no error. Now: refused, nothing lost, clone syncs."""
    hub = Database.open(tmp_path / "hub.db")
    a = Database.open(tmp_path / "a.db")
    _write_topics(a, "base", 10)
    a.close()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")  # the copied app folder
    a = Database.open(tmp_path / "a.db")
    copy = Database.open(tmp_path / "copy.db")
    try:
        assert copy.site_id == a.site_id and copy.incarnation != a.incarnation
        _write_topics(a, "a", 50)
        Peer(a).sync_with(Peer(hub))
        _write_topics(copy, "c", 80)
        before = state(hub)
        marks = watermarks(hub)
        with pytest.raises(DuplicateSiteError, match="crdt-sync clone") as refused:
            Peer(copy).sync_with(Peer(hub))
        assert refused.value.site_id == a.site_id and refused.value.permanent
        assert state(hub) == before and watermarks(hub) == marks  # nothing applied, nothing moved
        Peer(a).sync_with(Peer(hub))  # the original goes on syncing
        clone_site = copy.clone_to(tmp_path / "clone.db")
        clone = Database.open(tmp_path / "clone.db")
        try:
            assert clone.site_id == clone_site != a.site_id
            Peer(clone).sync_with(Peer(hub))
            names = [row[2] for row in state(hub)]
            assert names.count("c") == 80 and names.count("a") == 50 and names.count("base") == 10
        finally:
            clone.close()
    finally:
        for db in (a, copy, hub):
            db.close()


def test_the_original_is_refused_when_its_copy_synced_first(tmp_path):
    """Whichever of the two files reaches a peer second is told: one of them must be cloned."""
    hub = Database.open(tmp_path / "hub.db")
    a = Database.open(tmp_path / "a.db")
    _write_topics(a, "base", 3)
    Peer(a).sync_with(Peer(hub))
    a.close()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    a = Database.open(tmp_path / "a.db")
    copy = Database.open(tmp_path / "copy.db")
    try:
        _write_topics(copy, "c", 5)
        Peer(copy).sync_with(Peer(hub))  # the copy began where the hub's record ends: it continues
        _write_topics(a, "a", 5)
        with pytest.raises(DuplicateSiteError):
            Peer(a).sync_with(Peer(hub))
        with pytest.raises(DuplicateSiteError):  # as the server, too
            Peer(hub).sync_with(Peer(a))
    finally:
        for db in (a, copy, hub):
            db.close()


def test_reopening_moving_and_sharing_a_file_are_not_copies(tmp_path):
    hub = Database.open(tmp_path / "hub.db")
    a = Database.open(tmp_path / "a.db")
    first = a.incarnation
    topic(a, "t1")
    Peer(a).sync_with(Peer(hub))
    second_object = Database.open(tmp_path / "a.db")  # another connection (or process) on the file
    assert second_object.incarnation == first
    topic(second_object, "t2")
    Peer(second_object).sync_with(Peer(hub))
    second_object.close()
    a.close()
    (tmp_path / "moved").mkdir()
    for suffix in ("", "-wal", "-shm"):
        if (tmp_path / f"a.db{suffix}").exists():
            shutil.move(tmp_path / f"a.db{suffix}", tmp_path / "moved" / f"a.db{suffix}")
    a = Database.open(tmp_path / "moved" / "a.db")
    try:
        topic(a, "t3")
        Peer(a).sync_with(Peer(hub))
        Peer(hub).sync_with(Peer(a))
        assert [row[0] for row in state(hub)] == ["t1", "t2", "t3"]
    finally:
        a.close()
        hub.close()


def test_crdt_sync_clone_end_to_end_over_websocket(tmp_path, capsys):
    hub_path, a_path, copy_path, clone_path = (str(tmp_path / n) for n in ("hub.db", "a.db", "copy.db", "clone.db"))
    assert cli(["init", hub_path]) == 0 and cli(["init", a_path]) == 0
    with Database.open(a_path) as a:
        _write_topics(a, "base", 2)
    shutil.copy(a_path, copy_path)
    hub = Database.open(hub_path)
    try:
        with serve(hub) as server:
            with Database.open(a_path) as a:
                _write_topics(a, "a", 3)
            assert cli(["sync", a_path, server.url, "--quiet"]) == 0
            with Database.open(copy_path) as copy:
                _write_topics(copy, "c", 4)
            capsys.readouterr()
            assert cli(["sync", copy_path, server.url, "--quiet"]) == 1
            assert "crdt-sync clone" in capsys.readouterr().err
            assert cli(["clone", copy_path, clone_path]) == 0
            assert "site id" in capsys.readouterr().out
            assert cli(["clone", copy_path, clone_path]) == 1  # never overwrites
            assert cli(["sync", clone_path, server.url, "--quiet"]) == 0
        assert [row[2] for row in state(hub)].count("c") == 4
    finally:
        hub.close()


# -- 5. reads never wait for merges; one notifier; commits through db.connection pushed live ---


def test_a_read_does_not_wait_for_a_merge_in_progress(open_db):
    """A real merge is held open inside its transaction (a merge listener waits); meanwhile
    another thread's `reading()` completes, seeing the snapshot before the merge."""
    a, b = open_db("a"), open_db("b")
    topic(b, "before")
    _write_topics(a, "m", 200)
    in_merge, read_done = threading.Event(), threading.Event()

    def hold(tx, merged):
        in_merge.set()
        assert read_done.wait(WAIT), "the read waited for the merge"

    b.on_merge(hold)
    seen = []

    def reader():
        assert in_merge.wait(WAIT)
        with b.reading() as s:
            seen.append(s.scalar("SELECT count(*) FROM topics"))
        read_done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    Peer(b).sync_with(Peer(a))  # blocks in `hold` until the reader is done
    thread.join(WAIT)
    assert read_done.is_set() and seen[0] == 1  # read during the merge: the pre-merge snapshot
    assert len(state(b)) == 201


def test_a_read_does_not_wait_for_a_long_write_transaction(open_db):
    db = open_db("a")
    topic(db, "t1")
    in_tx, read_done = threading.Event(), threading.Event()

    def writer():
        with db.transaction() as tx:
            tx.execute("UPDATE topics SET name = 'uncommitted' WHERE id = 't1'")
            in_tx.set()
            read_done.wait(WAIT)

    thread = threading.Thread(target=writer)
    thread.start()
    assert in_tx.wait(WAIT)
    assert state(db)[0][2] == ""  # committed state, at once, while the writer holds its lock
    read_done.set()
    thread.join(WAIT)
    assert state(db)[0][2] == "uncommitted"


def test_a_write_through_db_connection_is_pushed_live(open_db):
    hub, client = open_db("hub"), open_db("client")
    with serve(hub) as server, connect(client, server.url) as live:
        live.wait_connected(WAIT)
        hub.connection.execute("INSERT INTO topics (id, workflow_id, name) VALUES ('raw', 'wf', 'direct')")
        wait_until(lambda: [r[0] for r in state(client)] == ["raw"], "the raw write to reach the client")


def test_one_notifier_per_database_serves_every_session(open_db):
    hub = open_db("hub")
    clients = [open_db(f"c{i}") for i in range(3)]
    with serve(hub) as server:
        lives = [connect(c, server.url) for c in clients]
        try:
            for live in lives:
                live.wait_connected(WAIT)
            names = [t.name for t in threading.enumerate()]
            assert names.count(f"engine-notifier {hub.path}") == 1
            for c in clients:
                assert names.count(f"engine-notifier {c.path}") == 1
            assert not [n for n in names if "data-version-poll" in n]
            topic(hub, "t1")
            for c in clients:
                wait_until(lambda c=c: len(state(c)) == 1, "the write to reach every client")
        finally:
            for live in lives:
                live.close()


# -- 6. a server outliving a migration by another process ------------------------------------


def test_a_peer_re_reads_the_schema_after_another_connection_migrates(tmp_path, open_db):
    from engine.migrations import DEFAULT_MIGRATIONS_DIR

    migrations = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    server_db = open_db("shared", migrations=migrations)
    peer = Peer(server_db)
    old = (peer.fingerprint, peer.schema_version)
    (migrations / "0100_color.sql").write_text(
        "SELECT crsql_begin_alter('topics');\n"
        "ALTER TABLE topics ADD COLUMN color TEXT NOT NULL DEFAULT '';\n"
        "SELECT crsql_commit_alter('topics');\n"
    )
    upgraded = open_db("shared", migrations=migrations)  # "another process" runs the new migration
    assert upgraded.schema_version == 100
    assert (peer.fingerprint, peer.schema_version) == (upgraded.schema_fingerprint, 100) != old
    client = open_db("client", migrations=migrations)
    with client.transaction() as tx:
        tx.execute("INSERT INTO topics (id, name, color) VALUES ('t1', 'x', 'red')")
    Peer(client).sync_with(peer)  # accepted: both announce the new schema, color included
    with server_db.reading() as s:
        assert s.scalar("SELECT color FROM topics WHERE id = 't1'") == "red"


def test_a_client_that_never_completes_the_handshake_is_dropped(open_db):
    """A silent connection must not hold a server thread for ever; others are still served."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    hub, other = open_db("hub"), open_db("other")
    topic(hub, "t1")
    with serve(hub, handshake_timeout=0.3) as server:
        with ws_connect(server.url) as silent:
            with pytest.raises(ConnectionClosed):
                silent.recv(timeout=WAIT)  # the server closes it; nothing was ever sent
        assert Peer(other).sync_with(server.url).pulled == 3
