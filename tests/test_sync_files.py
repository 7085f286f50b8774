"""The file transport: round trip, exclusion of the target's own changes, watermarks, and
files that are truncated, tampered, foreign or from another schema (nothing applied)."""

from __future__ import annotations

import shutil

import pytest

from engine.migrations import DEFAULT_MIGRATIONS_DIR
from sync import CorruptFileError, Peer, SchemaMismatchError, export_changes, import_changes
from sync.changes import Limits
from sync.watermarks import watermarks
from sync.files import MAGIC
from sync.testing import assert_converged
from test_sync_support import state, topic, write


@pytest.fixture
def exported(open_db, tmp_path):
    """`a` with three transactions (one of 30 changes) exported for `b`."""
    a, b = open_db("a"), open_db("b")
    topic(a, "t1", "one")
    with a.transaction() as tx:
        for i in range(10):
            tx.execute("INSERT INTO topics (id, name) VALUES (?, 'batch')", (f"b{i}",))
    write(a, "DELETE FROM topics WHERE id = 't1'")
    path = tmp_path / "a-for-b.crsync"
    count = export_changes(a, path, for_site=b.site_id, limits=Limits(page_changes=8))
    return a, b, path, count


def test_round_trip(exported):
    a, b, path, count = exported
    assert count == 31  # the 10-row transaction (30) + t1's delete sentinel (its columns were overwritten)
    assert path.read_bytes().startswith(MAGIC)
    assert import_changes(b, path) == 31
    assert state(b) == state(a) and len(state(b)) == 10
    assert import_changes(b, path) == 31  # idempotent
    assert state(b) == state(a)


def test_import_moves_the_watermark_so_the_next_sync_resumes_after_it(exported):
    a, b, path, _ = exported
    import_changes(b, path)
    assert {m.site_id: m.received for m in watermarks(b)} == {a.site_id: a.db_version}
    result = Peer(b).sync_with(Peer(a))
    assert (result.pulled, result.pushed) == (0, 0)


def test_export_leaves_out_the_targets_own_changes(open_db, tmp_path):
    a, b = open_db("a"), open_db("b")
    topic(b, "from-b")
    Peer(a).sync_with(Peer(b))
    topic(a, "from-a")
    path = tmp_path / "f"
    assert export_changes(a, path, for_site=b.site_id) == 3
    assert export_changes(a, tmp_path / "all") == 6
    assert import_changes(b, path) == 3
    assert_converged([a, b])


def test_since_limits_the_export(open_db, tmp_path):
    a, b = open_db("a"), open_db("b")
    topic(a, "old")
    since = a.db_version
    topic(a, "new")
    assert export_changes(a, tmp_path / "f", for_site=b.site_id, since=since) == 3
    import_changes(b, tmp_path / "f")
    assert [row[0] for row in state(b)] == ["new"]
    assert watermarks(b) == []  # the file does not start at b's watermark (0): it proves nothing


def test_a_file_for_another_replica_applies_without_moving_watermarks(exported, open_db):
    a, b, path, _ = exported
    c = open_db("c")
    assert import_changes(c, path) == 31
    assert state(c) == state(a) and watermarks(c) == []


@pytest.mark.parametrize("keep", [0, 4, len(MAGIC), len(MAGIC) + 3, 60, -40, -1], ids=str)
def test_a_truncated_file_raises_and_applies_nothing(exported, tmp_path, keep):
    a, b, path, _ = exported
    data = path.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CorruptFileError) as caught:
        import_changes(b, cut)
    assert "nothing was imported" in str(caught.value)
    assert state(b) == [] and watermarks(b) == []


def test_every_tampered_byte_is_caught(exported, tmp_path):
    """Flip each of a sample of bytes across the file: always refused, never applied."""
    a, b, path, _ = exported
    data = path.read_bytes()
    bad = tmp_path / "bad"
    for position in range(0, len(data), max(1, len(data) // 60)):
        tampered = bytearray(data)
        tampered[position] ^= 0x20
        bad.write_bytes(bytes(tampered))
        with pytest.raises((CorruptFileError, SchemaMismatchError)):
            import_changes(b, bad)
    assert state(b) == [] and watermarks(b) == []


def test_a_tampered_value_with_a_valid_structure_fails_the_checksum(exported, tmp_path):
    a, b, path, _ = exported
    data = path.read_bytes()
    assert data.count(b"batch") >= 1
    bad = tmp_path / "bad"
    bad.write_bytes(data.replace(b"batch", b"botch", 1))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        import_changes(b, bad)
    assert state(b) == []


def test_not_an_export_file(db, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CorruptFileError, match="bad magic"):
        import_changes(db, path)
    with pytest.raises(CorruptFileError, match="cannot be read"):
        import_changes(db, tmp_path / "missing")


def test_a_file_from_another_schema_is_refused(open_db, tmp_path):
    folder = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, folder)
    (folder / "9000_extra.sql").write_text("CREATE TABLE notes (id TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL DEFAULT '');")
    newer, older = open_db("newer", migrations=folder), open_db("older")
    write(newer, "INSERT INTO notes (id, body) VALUES ('n1', 'hi')")
    export_changes(newer, tmp_path / "f")
    with pytest.raises(SchemaMismatchError, match="schema version 9000"):
        import_changes(older, tmp_path / "f")
    assert_converged([older, open_db("empty")])


def test_own_export_and_bad_site_ids_are_refused(exported, tmp_path):
    a, b, path, _ = exported
    with pytest.raises(CorruptFileError, match="exported by this very replica"):
        import_changes(a, path)
    with pytest.raises(ValueError, match="is not a site id"):
        export_changes(a, tmp_path / "x", for_site="b")
    with pytest.raises(ValueError, match="this replica itself"):
        export_changes(a, tmp_path / "x", for_site=a.site_id)
    assert not (tmp_path / "x").exists()
