"""`crdt-sync init / id / trust / untrust / status`: keys and the trust list from the command line."""

from __future__ import annotations

import pytest

from engine import Database
from sync.identity import Identity, load_identity
from sync.trust import Grant, find_trusted, trusted_peers
from tests.test_cli import assert_one_line_error, make_db, run


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
