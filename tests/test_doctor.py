"""`python -m engine doctor` and `crdt-sync doctor`: the facts of a replica, a non-zero exit with
a one-line reason when something is wrong, and a file left as it was found."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from engine import Database
from engine.__main__ import main as engine_main
from engine.doctor import diagnose
from engine.migrations import DEFAULT_MIGRATIONS_DIR, applied_version
from sync import Peer
from sync.cli import main as sync_main

ROOT = Path(__file__).resolve().parent.parent


def doctor(capsys, *argv: str, cli=engine_main) -> tuple[int, str, str]:
    code = cli(["doctor", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def fact(out: str, label: str) -> str:
    """The value printed for `label` (the first line that has it)."""
    for line in out.splitlines():
        if line.startswith(f"{label}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {label!r} line in:\n{out}")


def assert_failed_with(code: int, err: str, prog: str, *needles: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def old_schema(tmp_path: Path) -> Path:
    """A copy of the migrations without the latest one."""
    folder = tmp_path / "old-migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, folder)
    max(folder.glob("*.sql")).unlink()
    return folder


def test_a_healthy_replica_shows_its_facts(capsys, open_db):
    db = open_db("app")
    db.topics.get_or_create("wf", "inbox")
    conflict, _ = db.conflicts.record("two_active_runs", "wf", ["r1", "r2"], {})
    wal_bytes = Path(db.path + "-wal").stat().st_size  # db stays open: its WAL is there to measure
    code, out, err = doctor(capsys, db.path)  # (measured before cr-sqlite's open writes its config)
    assert (code, err) == (0, "")
    assert fact(out, "database") == db.path and fact(out, "integrity") == "ok"
    assert fact(out, "extension").endswith("crsqlite.so")
    assert fact(out, "cr-sqlite").startswith("v0.16.3 loaded (SQLite 3.")
    assert fact(out, "site id") == db.site_id
    assert fact(out, "db_version") == str(db.db_version)
    latest = db.schema_version
    assert fact(out, "schema version") == f"{latest} (fingerprint {db.schema_fingerprint}); the code's latest is {latest}"
    assert fact(out, "CRR tables") == f"{len(db.crr_tables)}: {', '.join(db.crr_tables)}"
    assert fact(out, "open conflicts") == "1"
    assert wal_bytes > 0 and fact(out, "WAL size") == f"{wal_bytes:,} bytes"
    assert "sync peers" not in out  # the engine's doctor knows nothing of sync
    db.conflicts.resolve(conflict.id)
    assert fact(doctor(capsys, db.path)[1], "open conflicts") == "0"


def test_python_dash_m_engine_runs_it_without_importing_sync(tmp_path):
    path = tmp_path / "app.db"
    Database.open(path).close()
    check = (
        "import sys, runpy\n"
        f"sys.argv = ['engine', 'doctor', {str(path)!r}]\n"
        "try:\n"
        "    runpy.run_module('engine', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "assert not [m for m in sys.modules if m == 'sync' or m.startswith('sync.')], 'engine imported sync'\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "site id:" in done.stdout and "schema version:" in done.stdout
    cli = subprocess.run([sys.executable, "-m", "engine", "doctor", tmp_path / "missing.db"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert cli.returncode == 1 and cli.stderr.startswith("python -m engine: error: cannot read ")


def test_a_missing_file_is_reported_and_not_created(capsys, tmp_path):
    path = tmp_path / "nowhere.db"
    code, out, err = doctor(capsys, path)
    assert_failed_with(code, err, "python -m engine", f"cannot read {path}", "No such file")
    assert not path.exists()


def test_a_file_that_is_not_a_database(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, _, err = doctor(capsys, path)
    assert_failed_with(code, err, "python -m engine", "is not an SQLite database")


def test_a_plain_sqlite_file_is_reported_and_left_alone(capsys, tmp_path):
    path = tmp_path / "plain.db"
    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE t (x)")
    connection.close()
    before = path.read_bytes()
    code, out, err = doctor(capsys, path)
    assert_failed_with(code, err, "python -m engine", "not a cr-sqlite replica")
    assert fact(out, "integrity") == "ok"
    assert path.read_bytes() == before


def test_a_missing_extension_says_how_to_get_one(capsys, tmp_path, monkeypatch):
    path = tmp_path / "app.db"
    Database.open(path).close()
    monkeypatch.setenv("CRSQLITE_PATH", str(tmp_path / "no" / "crsqlite.so"))
    code, out, err = doctor(capsys, path)
    assert_failed_with(code, err, "python -m engine", "cr-sqlite extension not found", "CRSQLITE_PATH", "make extension")
    assert fact(out, "integrity") == "ok"  # what could be learnt without it is still shown


def test_a_database_behind_the_code_is_not_migrated(capsys, tmp_path):
    path = tmp_path / "app.db"
    Database.open(path, migrations=old_schema(tmp_path)).close()
    code, out, err = doctor(capsys, path)
    assert (code, err) == (0, "")
    assert fact(out, "schema version").endswith(": 1 migration(s) will be applied on the next open")
    connection = apsw.Connection(str(path))
    try:
        assert applied_version(connection) == len(list(DEFAULT_MIGRATIONS_DIR.glob("*.sql"))) - 1
    finally:
        connection.close()


def test_a_database_newer_than_the_code_is_a_problem(capsys, tmp_path):
    path = tmp_path / "app.db"
    Database.open(path).close()
    code, _, err = doctor(capsys, path, "--migrations", old_schema(tmp_path))
    assert_failed_with(code, err, "python -m engine", "newer than this code", "upgrade the engine")


def test_crdt_sync_doctor_adds_the_peers(capsys, tmp_path):
    a_path, b_path = tmp_path / "a.db", tmp_path / "b.db"
    with Database.open(a_path) as a, Database.open(b_path) as b:
        a.topics.get_or_create("wf", "inbox")
        Peer(b).sync_with(Peer(a))
        site_a, version_a = a.site_id, a.db_version
    code, out, err = doctor(capsys, b_path, cli=sync_main)
    assert (code, err) == (0, "")
    assert fact(out, "sync peers") == "1"
    assert fact(out, "peer").startswith(f"{site_a}  received through its db_version {version_a}, acked through ours ")
    code, out, _ = doctor(capsys, tmp_path / "fresh.db", cli=sync_main)
    assert code == 1


def test_crdt_sync_doctor_fails_with_one_line(capsys, tmp_path, monkeypatch):
    path = tmp_path / "app.db"
    Database.open(path).close()
    monkeypatch.setenv("CRSQLITE_PATH", str(tmp_path / "missing.so"))
    code, _, err = doctor(capsys, path, cli=sync_main)
    assert_failed_with(code, err, "crdt-sync", "cr-sqlite extension not found")


def test_diagnose_returns_the_facts_as_data(tmp_path):
    path = tmp_path / "app.db"
    with Database.open(path) as db:
        site = db.site_id
    diagnosis = diagnose(path)
    assert diagnosis.ok and diagnosis.problems == []
    assert {f.label: f.value for f in diagnosis.facts}["site id"] == site
    missing = diagnose(tmp_path / "none.db")
    assert not missing.ok and len(missing.problems) == 1


@pytest.mark.parametrize("cli", [engine_main, sync_main])
def test_doctor_help_prints(capsys, cli):
    with pytest.raises(SystemExit) as exited:
        cli(["doctor", "--help"])
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out
