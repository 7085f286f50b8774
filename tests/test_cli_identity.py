"""`crdt-sync init / id / trust / untrust / status`, and `serve` / `sync` with keys and TLS."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from engine import Database
from sync.identity import Identity, load_identity
from sync.trust import Grant, find_trusted, trusted_peers
from tests.test_cli import ROOT, assert_one_line_error, make_db, run, topics_of


def test_init_creates_the_key_and_id_prints_it(capsys, tmp_path):
    path = tmp_path / "a.db"
    code, out, _ = run(capsys, "init", path)
    assert code == 0
    key = out.strip().splitlines()[-1].removeprefix("public key ")
    with Database.open(path) as db:
        assert load_identity(db, create=False).public_text == key
    code, out, _ = run(capsys, "id", path)
    assert code == 0 and out.strip() == key
    code, out, _ = run(capsys, "init", path)  # reopening keeps the key
    assert code == 0 and out.strip().endswith(key)


def test_id_creates_a_key_for_an_older_replica(capsys, tmp_path):
    path = tmp_path / "old.db"
    make_db(path)
    code, out, _ = run(capsys, "id", path)
    assert code == 0 and out.startswith("ed25519:")
    with Database.open(path) as db:
        assert load_identity(db, create=False).public_text == out.strip()


def test_trust_untrust_and_status(capsys, tmp_path):
    path = tmp_path / "hub.db"
    make_db(path)
    laptop, phone = Identity.generate().public_text, Identity.generate().public_text
    code, out, _ = run(capsys, "trust", path, laptop, "--name", "laptop", "--can", "write", "--tables", "events,topics")
    assert code == 0 and out.strip() == f"trusted laptop  write (events, topics)  {laptop}"
    code, out, _ = run(capsys, "trust", path, phone, "--name", "phone", "--can", "read")
    assert code == 0
    with Database.open(path) as db:
        assert find_trusted(db, Identity.generate().public_key) is None
        assert [(e.name, e.can, e.tables) for e in trusted_peers(db)] == [
            ("laptop", Grant.WRITE, ("events", "topics")), ("phone", Grant.READ, ())]
    code, out, _ = run(capsys, "status", path)
    assert code == 0 and "trusted peers:  2" in out and f"  phone  read  {phone}" in out
    assert "public key:     (none yet" in out
    code, out, _ = run(capsys, "untrust", path, laptop)
    assert code == 0 and out.strip() == f"untrusted {laptop}"
    code, out, err = run(capsys, "untrust", path, laptop)
    assert_one_line_error(code, out, err, "not in the trust list")
    code, out, _ = run(capsys, "status", path)
    assert "trusted peers:  1" in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--can", "write", "--tables", "nope"], "no replicated table named 'nope'"),
        (["--can", "read", "--tables", "events"], "limits writes"),
        (["--can", "write", "--name", " "], "needs a name"),
    ],
)
def test_bad_trust_requests_are_one_line_errors(capsys, tmp_path, extra, needle):
    path = tmp_path / "hub.db"
    make_db(path)
    argv = ["trust", path, Identity.generate().public_text, "--name", "x", *extra]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, needle)
    with Database.open(path) as db:
        assert trusted_peers(db) == []


def test_trusting_its_own_key_is_refused(capsys, tmp_path):
    path = tmp_path / "a.db"
    run(capsys, "init", path)
    _, own, _ = run(capsys, "id", path)
    code, out, err = run(capsys, "trust", path, own.strip(), "--name", "me", "--can", "write")
    assert_one_line_error(code, out, err, "this replica's own key")


def test_malformed_keys_and_grants_are_usage_errors(capsys, tmp_path):
    path = tmp_path / "a.db"
    make_db(path)
    for argv in (["trust", path, "ed25519:short", "--name", "x", "--can", "read"],
                 ["trust", path, Identity.generate().public_text, "--name", "x", "--can", "admin"],
                 ["untrust", path, "not-a-key"]):
        with pytest.raises(SystemExit) as exited:
            run(capsys, *argv)
        assert exited.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_missing_database_is_not_created(capsys, tmp_path):
    code, out, err = run(capsys, "id", tmp_path / "missing.db")
    assert_one_line_error(code, out, err, "no database")
    assert not (tmp_path / "missing.db").exists()


# -- serve and sync with keys and TLS ------------------------------------------------------


def _key_of(capsys, path) -> str:
    code, out, _ = run(capsys, "id", path)
    assert code == 0
    return out.strip()


def test_serve_with_keys_and_tls_then_sync_by_key(capsys, tmp_path):
    """The whole setup from the command line: init both, trust each other, serve wss:// with
    --keys, sync with the server's key and its pinned certificate."""
    from sync.tls import write_self_signed

    hub, laptop = tmp_path / "hub.db", tmp_path / "laptop.db"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    make_db(hub, "h1")
    make_db(laptop, "l1")
    hub_key, laptop_key = _key_of(capsys, hub), _key_of(capsys, laptop)
    assert run(capsys, "trust", hub, laptop_key, "--name", "laptop", "--can", "write")[0] == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "sync.cli", "serve", hub, "--port", "0", "--keys", "--cert", cert, "--key", key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        banner = process.stdout.readline()
        assert f"key {hub_key}) on wss://127.0.0.1:" in banner, banner
        url = banner.split(" on ")[1].split(";")[0]
        code, out, err = run(capsys, "sync", laptop, url, "--server-key", hub_key, "--cafile", cert, "-q")
        assert code == 0, err
        assert out.startswith("pulled 3 changes, pushed 3 changes")
        code, out, err = run(capsys, "sync", laptop, url, "--keys", "--no-verify", "-q")  # hub not trusted here
        assert_one_line_error(code, out, err, "not in this replica's trust list")
        assert run(capsys, "trust", laptop, hub_key, "--name", "hub", "--can", "read")[0] == 0
        code, out, err = run(capsys, "sync", laptop, url, "--keys", "--no-verify", "-q")
        assert code == 0, err
        code, out, err = run(capsys, "sync", laptop, url.replace("wss://", "ws://"), "--server-key", hub_key, "-q")
        assert_one_line_error(code, out, err, "the server speaks TLS; use wss://")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert topics_of(hub) == topics_of(laptop) == {"h1", "l1"}


def test_an_untrusted_client_is_a_one_line_error(capsys, tmp_path):
    from sync.websocket import serve

    hub, stranger = tmp_path / "hub.db", tmp_path / "stranger.db"
    make_db(hub, "h1")
    make_db(stranger)
    with Database.open(hub) as db, serve(db, require_keys=True) as server:
        hub_key = load_identity(db).public_text
        code, out, err = run(capsys, "sync", stranger, server.url, "--server-key", hub_key, "-q")
        assert_one_line_error(code, out, err, "unknown_peer", "is not trusted here")
        code, out, err = run(capsys, "sync", stranger, server.url, "-q")  # no key at all
        assert_one_line_error(code, out, err, "admits only trusted keys")
    assert topics_of(stranger) == set()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sync", "{db}", "ws://127.0.0.1:1", "--cafile", "x.pem"], "apply to wss:// URLs"),
        (["sync", "{db}", "wss://127.0.0.1:1", "--no-verify"], "needs key authentication"),
        (["serve", "{db}", "--port", "0", "--cert", "x.pem"], "--cert and --key go together"),
        (["serve", "{db}", "--port", "0", "--cert", "{tmp}/none.pem", "--key", "{tmp}/none.pem"], "no such certificate"),
    ],
)
def test_bad_tls_options_are_one_line_errors(capsys, tmp_path, argv, needle):
    path = tmp_path / "a.db"
    make_db(path)
    argv = [a.format(db=path, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, needle)


def test_clone_prints_the_clones_new_key(capsys, tmp_path):
    src, dst = tmp_path / "a.db", tmp_path / "b.db"
    make_db(src, "t")
    original = _key_of(capsys, src)
    code, out, _ = run(capsys, "clone", src, dst)
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert line.startswith("public key of the clone ed25519:") and original not in line
    assert _key_of(capsys, dst) in line
