"""Shared fixtures: every test runs on the real extension and the real migrations."""

from __future__ import annotations

import pytest

from engine import Database, ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_ms=1_700_000_000_000)


@pytest.fixture
def open_db(tmp_path, clock):
    """Factory: open_db(name="a") opens (or reopens) a replica file under tmp_path; all are
    closed at teardown."""
    opened: list[Database] = []

    def factory(name: str = "replica", **kwargs) -> Database:
        kwargs.setdefault("clock", clock)
        db = Database.open(tmp_path / f"{name}.db", **kwargs)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        db.close()


@pytest.fixture
def db(open_db) -> Database:
    """A fresh replica on a temp file with a manual clock."""
    return open_db("db")
