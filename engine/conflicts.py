"""Conflicts found after a merge, recorded as rows that replicate like everything else.

The id is derived from the kind and the sorted subjects, so the same conflict detected on two
replicas is one row once they sync; re-detecting it is a no-op (an existing row keeps its
status, so a resolved conflict stays resolved).

    for conflict in db.conflicts.list(status="open"):
        print(conflict.kind, conflict.subjects, conflict.detail)
        db.conflicts.resolve(conflict.id)
"""

from __future__ import annotations

from typing import Any

import msgspec

from .database import Database, Session
from .errors import InvalidTransitionError
from .rows import Table, deterministic_id, encode_json, require_text

__all__ = ["Conflict", "ConflictStore", "KINDS"]

# double_reservation: an event reserved/consumed by a run other than the one whose prepare_result reserved it
# two_active_runs:    two active runs of one workflow
# non_owner_write:    a run's phase or status written by a replica that does not own the workflow
KINDS = ("double_reservation", "two_active_runs", "non_owner_write")


class Conflict(msgspec.Struct, frozen=True):
    id: str
    kind: str
    workflow_id: str
    subjects: list[str]
    detail: dict[str, Any]
    status: str  # open | resolved
    detected_at: int
    detected_by: str
    resolved_at: int


_table = Table("conflicts", Conflict, json_columns={"subjects": None, "detail": None})


def conflict_id(kind: str, subjects: list[str]) -> str:
    return deterministic_id(kind, *sorted(subjects))


class ConflictStore:
    def __init__(self, db: Database):
        self.db = db

    def record(
        self, kind: str, workflow_id: str, subjects: list[str], detail: dict[str, Any], *, tx: Session | None = None
    ) -> tuple[Conflict, bool]:
        """Record a conflict unless it is already known; return (row, created).

        Raises:
            ValueError: unknown kind, empty workflow id or no subjects.
        """
        if kind not in KINDS:
            raise ValueError(f"conflict kind {kind!r} is not one of {list(KINDS)}")
        require_text("workflow_id", workflow_id)
        if not subjects:
            raise ValueError("a conflict needs at least one subject")
        id = conflict_id(kind, subjects)
        with self.db.transaction(tx) as s:
            s.execute(
                "INSERT OR IGNORE INTO conflicts (id, kind, workflow_id, subjects, detail, detected_at, detected_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (id, kind, workflow_id, encode_json(sorted(subjects)), encode_json(detail), s.now_ms(), self.db.site_id),
            )
            created = s.changes() == 1
            return _table.require(s, id), created

    def get(self, id: str, *, tx: Session | None = None) -> Conflict | None:
        with self.db.reading(tx) as s:
            return _table.get(s, id)

    def list(
        self, *, workflow_id: str | None = None, status: str | None = "open", kind: str | None = None,
        tx: Session | None = None,
    ) -> list[Conflict]:
        """Conflicts, oldest first; open ones by default (status=None for all)."""
        where, params = [], []
        for column, value in (("workflow_id", workflow_id), ("status", status), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        with self.db.reading(tx) as s:
            return _table.query(s, " AND ".join(where), params, order="detected_at, id")

    def resolve(self, id: str, *, tx: Session | None = None) -> Conflict:
        """Mark a conflict resolved (a person or a tool dealt with it).

        Raises:
            NotFoundError: no such conflict.
            InvalidTransitionError: it is already resolved.
        """
        with self.db.transaction(tx) as s:
            current = _table.require(s, id)
            if current.status != "open":
                raise InvalidTransitionError("conflicts", id, "status", current.status, "resolved")
            _table.update(s, id, status="resolved", resolved_at=s.now_ms())
            return _table.require(s, id)
