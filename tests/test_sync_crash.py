"""A replica killed (SIGKILL) while merging keeps data and watermark consistent; a re-sync completes.

The receiving side runs in a child process that kills itself at a chosen point:
  - "mid-insert": an SQLite progress handler fires once a page's executemany wrote 100 rows;
  - "before-commit": the after-apply hook, after every row of the page is inserted;
  - "between-parts": after some parts of a split transaction arrived (spilled to a file that
    dies with the process; with `streaming`, also merged into a transaction that never commits).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sync import Peer
from sync.changes import Limits
from sync.watermarks import watermarks
from test_sync_support import state

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from engine import Database
    from sync import Peer
    from sync.changes import Limits
    from sync.peer import run_in_process
    from sync.protocol import Changes, decode

    source, target, mode, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    streaming = sys.argv[5] == "streaming"
    a, b = Database.open(source), Database.open(target)
    limits = Limits(page_changes=600)
    peer = Peer(b, limits=limits)
    die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    client = peer.session("client", streaming=streaming)
    receive, seen = client.receive, []

    def watch(data):
        if isinstance(decode(data), Changes):
            seen.append(1)
            if len(seen) == at:
                if mode == "mid-insert":  # once 100 rows of the page are written
                    base = b.connection.total_changes()
                    b.connection.set_progress_handler(
                        lambda: b.connection.total_changes() > base + 100 and die(), 500)
                elif mode == "before-commit":
                    b.on_merge(lambda tx, merged: die())
                elif mode == "between-parts":
                    die()
        return receive(data)

    client.receive = watch
    run_in_process(client, Peer(a, limits=limits).session("server"))
    print("finished without dying")
    """
)


def transactions(db) -> None:
    """Three transactions: 100 rows (300 changes), 150 rows (450), 500 rows (1500, split)."""
    for prefix, rows in (("one", 100), ("two", 150), ("three", 500)):
        with db.transaction() as tx:
            tx.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO topics (id, name) SELECT ? || '-' || i, ? FROM n",
                (rows - 1, prefix, prefix),
            )


def kill_child(source: Path, target: Path, mode: str, at: int, streaming: bool) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(target), mode, str(at), "streaming" if streaming else "spill"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr


@pytest.mark.parametrize(
    "mode, at, survivors, streaming",
    [
        ("mid-insert", 1, [], False),                    # page 1 = tx "one" (300 changes)
        ("before-commit", 2, ["one"], False),            # page 2 = tx "two"
        ("between-parts", 5, ["one", "two"], False),     # pages 3, 4 = parts 0, 1 of tx "three"
        ("between-parts", 5, ["one", "two"], True),      # the same, merged as they arrived
        ("before-commit", 5, ["one", "two"], True),      # all parts merged, last one's listener
    ],
)
def test_a_killed_receiver_stays_consistent_and_resyncs(open_db, tmp_path, mode, at, survivors, streaming):
    a = open_db("a")
    transactions(a)
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    open_db("b").close()  # create and migrate b, then let the child own it
    kill_child(source, target, mode, at, streaming)

    b = open_db("b")
    names = sorted({row[2] for row in state(b)})
    assert names == survivors  # whole transactions only
    expected_counts = {"one": 100, "two": 150}
    assert len(state(b)) == sum(expected_counts[n] for n in survivors)
    marks = {m.site_id: m.received for m in watermarks(b)}
    assert marks.get(a.site_id, 0) == len(survivors)  # each transaction is one db_version on a

    limits = Limits(page_changes=600)
    result = Peer(b, limits=limits).sync_with(Peer(a, limits=limits))
    assert result.pulled == 3 * (100 + 150 + 500) - 3 * sum(expected_counts[n] for n in survivors)
    assert state(b) == state(a)
    again = Peer(b).sync_with(Peer(a))
    assert (again.pulled, again.pushed) == (0, 0)
