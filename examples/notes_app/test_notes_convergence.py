"""Multi-replica tests of a user's own schema (migrations/0001_notes.sql) with sync.testing.

The `cluster` fixture and the `cluster` marker come from the pytest plugin that installing
the engine registers; nothing here is specific to the engine's own tables. Run with
`pytest examples/notes_app`; replay a failure with the `--cluster-seed` its report prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Database
from sync.testing import Cluster, Faults, run_schedule, schedules, sql_op

MIGRATIONS = Path(__file__).parent / "migrations"


@pytest.mark.cluster(n=3, schema_dir="migrations")
def test_three_replicas_converge_after_a_partition(cluster):
    cluster.write(0, "INSERT INTO notebooks (id, title) VALUES ('nb1', 'Ideas')")
    cluster.sync_all()
    cluster.partition([[0, 1], [2]])
    cluster.write(0, "INSERT INTO notes (id, notebook_id, body) VALUES ('n1', 'nb1', 'from r0')")
    cluster.write(2, "UPDATE notebooks SET title = 'Plans' WHERE id = 'nb1'")
    cluster.sync_all()  # rounds only inside each group
    assert cluster.query(2, "SELECT count(*) FROM notes") == [(0,)]
    cluster.heal()
    cluster.sync_all()
    cluster.assert_converged()
    assert cluster.query(1, "SELECT title FROM notebooks") == [("Plans",)]


@pytest.mark.cluster(n=3, schema_dir="migrations", faults=Faults(drop=0.2, duplicate=0.1, reorder=0.2, delay=0.2))
def test_concurrent_edits_converge_over_a_lossy_network(cluster, replicas):
    for i in range(3):
        cluster.write(i, "INSERT INTO notes (id, body, updated_at) VALUES (?, ?, ?)", (f"n{i}", f"by r{i}", i))
    cluster.sync_all()
    cluster.write(0, "UPDATE notes SET body = 'edit on r0' WHERE id = 'n1'")
    cluster.write(1, "UPDATE notes SET pinned = 1 WHERE id = 'n1'")  # another column: both edits survive
    cluster.write(2, "DELETE FROM notes WHERE id = 'n2'")
    cluster.restart(2)
    cluster.sync_all()
    cluster.assert_converged()
    with replicas[2].reading() as s:
        assert s.execute("SELECT id, body, pinned FROM notes ORDER BY id") == [
            ("n0", "by r0", 0), ("n1", "edit on r0", 1)]


# -- a property over generated schedules ------------------------------------------------

NOTEBOOKS = st.sampled_from(["nb1", "nb2"])
NOTES = st.sampled_from(["n1", "n2", "n3"])


class Archive(msgspec.Struct, frozen=True):
    """An operation of your own: any callable taking the Database, with a readable repr."""

    notebook: str

    def __call__(self, db: Database) -> None:
        with db.transaction() as tx:
            tx.execute("UPDATE notebooks SET archived = 1, updated_at = ? WHERE id = ?", (tx.now_ms(), self.notebook))


OPERATIONS = [
    sql_op("INSERT OR REPLACE INTO notebooks (id, title) VALUES (?, ?)", NOTEBOOKS, st.sampled_from(["a", "b"])),
    sql_op("INSERT OR REPLACE INTO notes (id, notebook_id, body) VALUES (?, ?, ?)", NOTES, NOTEBOOKS, st.text("xyz", max_size=2)),
    sql_op("UPDATE notes SET body = ? WHERE id = ?", st.text("xyz", max_size=2), NOTES),
    sql_op("DELETE FROM notes WHERE id = ?", NOTES),
    st.builds(Archive, NOTEBOOKS),
]


@settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "15")), deadline=None)
@given(schedule=schedules(OPERATIONS, n_replicas=3, max_steps=15))
def test_every_schedule_converges(schedule):
    with Cluster(3, schema_dir=MIGRATIONS) as cluster:
        run_schedule(cluster, schedule)
        cluster.converge()  # heal, sync everything over a perfect network, assert_converged
