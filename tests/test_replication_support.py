"""Small fixtures for the replicated-execution tests (imported as `test_replication_support`):
replicas that sync through `sync.Peer` with the after-merge audit installed, a full sync,
and a table-by-table comparison. Plus the checks of those helpers themselves.

Opening a replica runs every migration (~0.2 s here); a Hypothesis example opens three, so
the migrations run once into a template file that each replica copies and then gets a site
id of its own (derived from its index, so cr-sqlite's site-id tie-breaks replay the same).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

from engine import Database, ManualClock
from engine.database import close_connection, connect
from engine.migrations import crr_tables
from engine.replication import install_audit
from sync import Peer

__all__ = ["Replica", "open_replicas", "sync_until_quiet", "tables", "assert_converged", "START"]

START = 1_700_000_000_000
_template: Path | None = None
_template_dir = tempfile.TemporaryDirectory(prefix="replication-template-")


class Replica:
    """One replica: its database, its sync peer (the audit installed) and its own clock."""

    def __init__(self, db: Database, clock: ManualClock, index: int):
        self.db, self.clock, self.index = db, clock, index
        self.peer = Peer(db)
        install_audit(self.peer)

    @property
    def site_id(self) -> str:
        return self.db.site_id

    def sync_with(self, other: "Replica"):
        return self.peer.sync_with(other.peer)

    def __repr__(self) -> str:
        return f"<replica {self.index} {self.site_id[:8]}>"


def site_for(index: int, salt: str = "") -> bytes:
    return hashlib.sha256(f"replication-tests:{salt}:{index}".encode()).digest()[:16]


def _template_file() -> Path:
    global _template
    if _template is None:
        path = Path(_template_dir.name) / "template.db"
        Database.open(path, clock=ManualClock(START)).close()
        _template = path
    return _template


def open_replicas(directory: Path, n: int, *, salt: str = "", clock: ManualClock | None = None) -> list[Replica]:
    """n fresh replicas in `directory`, each with its own ManualClock at START (or all
    sharing `clock`). Close them with `close_all`."""
    replicas = []
    for index in range(n):
        path = Path(directory) / f"replica-{index}.db"
        shutil.copyfile(_template_file(), path)
        connection = connect(str(path))
        try:
            connection.execute("UPDATE crsql_site_id SET site_id = ? WHERE ordinal = 0", (site_for(index, salt),))
        finally:
            close_connection(connection)
        own = clock or ManualClock(START)
        replicas.append(Replica(Database.open(path, clock=own), own, index))
    return replicas


def close_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.db.close()


def sync_until_quiet(replicas: list[Replica], pairs: list[tuple[int, int]] | None = None, rounds: int = 12) -> int:
    """Sync every pair (all pairs by default) until a whole pass moves nothing (the audit's
    own repairs are changes too, so this may take a few passes); return the passes made.

    Raises:
        AssertionError: still moving changes after `rounds` passes.
    """
    pairs = pairs if pairs is not None else [(i, j) for i in range(len(replicas)) for j in range(i + 1, len(replicas))]
    for attempt in range(1, rounds + 1):
        moved = 0
        for i, j in pairs:
            result = replicas[i].sync_with(replicas[j])
            moved += result.pulled + result.pushed
        if moved == 0:
            return attempt
    raise AssertionError(f"replicas still exchange changes after {rounds} passes")


def tables(db: Database) -> dict[str, list[tuple]]:
    """Every CRR table's rows, ordered by primary key."""
    with db.reading() as s:
        return {t: s.execute(f'SELECT * FROM "{t}" ORDER BY 1') for t in crr_tables(s.connection)}


def assert_converged(replicas: list[Replica]) -> dict[str, list[tuple]]:
    """Every CRR table identical on every replica (naming the first difference); returns the state."""
    first = tables(replicas[0].db)
    for replica in replicas[1:]:
        other = tables(replica.db)
        for table in first:
            if first[table] != other[table]:
                mine = set(first[table]) ^ set(other[table])
                raise AssertionError(f"table {table} differs between {replicas[0]} and {replica}: {sorted(mine)[:4]}")
    return first


# -- the helpers' own checks ------------------------------------------------------------------


@pytest.fixture
def three(tmp_path):
    replicas = open_replicas(tmp_path, 3)
    yield replicas
    close_all(replicas)


def test_replicas_get_distinct_site_ids_and_the_audit(three):
    assert len({r.site_id for r in three}) == 3
    assert three[0].site_id == site_for(0).hex()
    assert len(three[0].peer.hooks) == 1
    assert install_audit(three[0].peer) is install_audit(three[0].db)  # installed once
    assert len(three[0].peer.hooks) == 1


def test_sync_until_quiet_converges_and_fails_loudly_when_told_to_stop_early(three):
    three[0].db.events.publish("wf", "inbox", "m1", {})
    three[2].db.events.publish("wf", "inbox", "m2", {})
    assert sync_until_quiet(three) in (2, 3)  # moving passes (relayed copies count), then a quiet one
    state = assert_converged(three)
    assert len(state["events"]) == 2
    three[1].db.events.publish("wf", "inbox", "m3", {})
    with pytest.raises(AssertionError, match="after 1 passes"):
        sync_until_quiet(three, rounds=1)
