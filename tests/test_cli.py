"""The `crdt-sync` command line, end to end: in-process through `main(argv)` and, for `serve`
and the console script, as real subprocesses."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from engine import Database
from sync import Peer
from sync.cli import build_parser, main, register_status_section
from sync.websocket import serve

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make_db(path: Path, *topics: str) -> str:
    with Database.open(path) as db:
        for topic in topics:
            with db.transaction() as tx:
                tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)", (topic, topic))
        return db.site_id


def topics_of(path: Path) -> set[str]:
    with Database.open(path) as db, db.reading() as s:
        return {row[0] for row in s.execute("SELECT id FROM topics")}


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crdt-sync: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- help ----------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_command_and_option_has_help():
    parser = build_parser()
    commands = _subcommands(parser)
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(helps) == {"init", "id", "trust", "untrust", "status", "doctor", "serve", "sync", "export", "import",
                          "clone"}
    for name, subparser in commands.choices.items():
        assert helps[name], f"command {name!r} has no help text"
        for action in subparser._actions:
            assert action.help, f"{name}: argument {action.dest!r} has no help text"


def test_help_of_each_command_prints(capsys):
    for name in ("init", "id", "trust", "untrust", "status", "doctor", "serve", "sync", "export", "import",
                 "clone"):
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: crdt-sync {name}")


def test_console_script_is_declared_and_installed():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["crdt-sync"] == "sync.cli:main"
    script = Path(sys.executable).with_name("crdt-sync")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "init" in done.stdout and "export" in done.stdout


# -- commands ------------------------------------------------------------------------------


def test_init_creates_then_reopens(capsys, tmp_path):
    path = tmp_path / "new.db"
    code, out, _ = run(capsys, "init", path)
    assert code == 0 and out.startswith(f"created {path}: site id ")
    with Database.open(path) as db:
        assert db.site_id in out
    code, out, _ = run(capsys, "init", path)
    assert code == 0 and out.startswith("opened existing")


def test_status_shows_identity_schema_tables_and_peers(capsys, tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    site_a, site_b = make_db(a, "t1", "t2"), make_db(b)
    with Database.open(a) as db_a, Database.open(b) as db_b:
        Peer(db_b).sync_with(Peer(db_a))
        version = db_b.db_version
    code, out, _ = run(capsys, "status", b)
    assert code == 0
    assert f"site id:        {site_b}" in out
    assert f"db_version:     {version}" in out
    assert "schema version: " in out and "topics (2 rows)" in out
    assert "known peers:    1" in out
    assert f"  {site_a}  received through its db_version 2" in out


def test_status_sections_can_be_added(capsys, tmp_path, monkeypatch):
    import sync.cli

    monkeypatch.setattr(sync.cli, "_status_sections", [])
    register_status_section(lambda db: [f"open conflicts: 0 ({db.site_id[:4]})"])
    path = tmp_path / "a.db"
    make_db(path)
    code, out, _ = run(capsys, "status", path)
    assert code == 0 and "known peers:    0" in out  # never synced: no bookkeeping tables yet
    assert out.rstrip().splitlines()[-1].startswith("open conflicts: 0 (")


def test_sync_pulls_and_pushes_with_progress_on_stderr(capsys, tmp_path):
    hub_path, client = tmp_path / "hub.db", tmp_path / "client.db"
    make_db(hub_path, "h1", "h2")
    make_db(client, "c1")
    with Database.open(hub_path) as hub, serve(hub, token=TOKEN) as server:
        code, out, err = run(capsys, "sync", client, server.url, "--token", TOKEN)
        assert code == 0
        assert out.strip() == f"pulled 6 changes, pushed 3 changes ({server.url})"
        assert "crdt-sync: ... pulled 6, pushed 0" in err and "crdt-sync: ... pulled 6, pushed 3" in err

        code, out, err = run(capsys, "sync", client, server.url, "--token", TOKEN, "--quiet")
        assert (code, out.strip(), err) == (0, f"pulled 0 changes, pushed 0 changes ({server.url})", "")
    assert topics_of(hub_path) == topics_of(client) == {"h1", "h2", "c1"}


def test_sync_takes_the_token_from_the_environment(capsys, tmp_path, monkeypatch):
    hub_path, client = tmp_path / "hub.db", tmp_path / "client.db"
    make_db(hub_path, "h1")
    make_db(client)
    monkeypatch.setenv("CRDT_SYNC_TOKEN", TOKEN)
    with Database.open(hub_path) as hub, serve(hub, token=TOKEN) as server:
        code, out, _ = run(capsys, "sync", client, server.url, "-q")
    assert code == 0 and out.startswith("pulled 3 changes")


def test_export_then_import_moves_the_changes(capsys, tmp_path):
    a, b, file = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "changes.bin"
    make_db(a, "x", "y")
    site_b = make_db(b)
    code, out, _ = run(capsys, "export", a, "--for", site_b.upper(), file)
    assert (code, out.strip()) == (0, f"exported 6 changes for {site_b} to {file}")
    code, out, _ = run(capsys, "import", b, file)
    assert (code, out.strip()) == (0, f"imported 6 changes from {file}")
    assert topics_of(b) == {"x", "y"}


def test_serve_runs_until_interrupted(tmp_path):
    hub_path, client = tmp_path / "hub.db", tmp_path / "client.db"
    make_db(hub_path, "h1")
    make_db(client, "c1")
    process = subprocess.Popen(
        [sys.executable, "-m", "sync.cli", "serve", hub_path, "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        banner = process.stdout.readline()
        assert banner.startswith(f"serving {hub_path} (site ") and " on ws://127.0.0.1:" in banner, banner
        url = banner.split(" on ")[1].split(";")[0]
        assert main(["sync", str(client), url, "--token", TOKEN, "-q"]) == 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stderr.read()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert topics_of(hub_path) == topics_of(client) == {"h1", "c1"}


def test_serve_with_peer_relays_live(tmp_path):
    """`serve B --peer ws://A`: B keeps a live connection to A, so A's new writes land in B."""
    a_path, b_path = tmp_path / "a.db", tmp_path / "b.db"
    make_db(a_path)
    make_db(b_path)
    with Database.open(a_path) as a, serve(a) as server_a:
        process = subprocess.Popen(
            [sys.executable, "-m", "sync.cli", "serve", b_path, "--port", "0", "--peer", server_a.url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )
        watchdog = threading.Timer(60, process.kill)
        watchdog.start()
        try:
            assert process.stdout.readline().startswith("serving ")
            with a.transaction() as tx:
                tx.execute("INSERT INTO topics (id) VALUES ('live-from-a')")
            deadline = time.monotonic() + 20
            while "live-from-a" not in topics_of(b_path):
                assert time.monotonic() < deadline, "A's write never reached B"
                time.sleep(0.02)  # sleep-ok: waiting for another process, bounded by the deadline
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()


# -- errors: one line, non-zero exit -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "{missing}"],
        ["sync", "{missing}", "ws://127.0.0.1:1"],
        ["export", "{missing}", "--for", "0" * 32, "{tmp}/out.bin"],
        ["import", "{missing}", "{tmp}/out.bin"],
        ["serve", "{missing}", "--port", "0"],
    ],
)
def test_a_missing_database_is_one_line_error(capsys, tmp_path, argv):
    missing = tmp_path / "missing.db"
    code, out, err = run(capsys, *[a.format(missing=missing, tmp=tmp_path) for a in argv])
    assert_one_line_error(code, out, err, "no database", str(missing))
    assert not missing.exists()


def test_init_in_a_missing_directory_is_one_line_error(capsys, tmp_path):
    code, out, err = run(capsys, "init", tmp_path / "nope" / "a.db")
    assert_one_line_error(code, out, err, "directory does not exist")


def test_bad_url_is_one_line_error(capsys, tmp_path):
    path = tmp_path / "a.db"
    make_db(path)
    code, out, err = run(capsys, "sync", path, "http://example.invalid/")
    assert_one_line_error(code, out, err, "bad URL")


def test_unreachable_server_is_one_line_error(capsys, tmp_path):
    path = tmp_path / "a.db"
    make_db(path)
    with Database.open(tmp_path / "hub.db") as hub:
        server = serve(hub)
        url = server.url
        server.close()
    code, out, err = run(capsys, "sync", path, url)
    assert_one_line_error(code, out, err, "cannot connect", url)


def test_refused_token_is_one_line_error(capsys, tmp_path):
    hub_path, client = tmp_path / "hub.db", tmp_path / "client.db"
    make_db(hub_path, "h1")
    make_db(client, "c1")
    with Database.open(hub_path) as hub, serve(hub, token=TOKEN) as server:
        code, out, err = run(capsys, "sync", client, server.url, "--token", "wrong")
    assert_one_line_error(code, out, err, "refused", "token")
    assert topics_of(client) == {"c1"} and topics_of(hub_path) == {"h1"}


def test_importing_a_corrupt_file_is_one_line_error(capsys, tmp_path):
    path, file = tmp_path / "a.db", tmp_path / "garbage.bin"
    make_db(path)
    file.write_bytes(b"definitely not an export file")
    code, out, err = run(capsys, "import", path, file)
    assert_one_line_error(code, out, err, str(file))
    code, out, err = run(capsys, "import", path, tmp_path / "absent.bin")
    assert_one_line_error(code, out, err, "no such file")


def test_exporting_for_itself_is_one_line_error(capsys, tmp_path):
    path = tmp_path / "a.db"
    site = make_db(path, "x")
    code, out, err = run(capsys, "export", path, "--for", site, tmp_path / "x.bin")
    assert_one_line_error(code, out, err, "this replica itself")
    assert not (tmp_path / "x.bin").exists()


def test_a_bad_site_id_is_a_usage_error(capsys, tmp_path):
    path = tmp_path / "a.db"
    make_db(path)
    with pytest.raises(SystemExit) as exited:
        main(["export", str(path), "--for", "not-a-site", str(tmp_path / "x.bin")])
    assert exited.value.code == 2
    assert "is not a site id" in capsys.readouterr().err
