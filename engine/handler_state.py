"""The handler state store: the state a handler carries from one run to the next, and when
it wants to be woken.

One row per (workflow_id, handler_name), its id derived from that pair (DESIGN.md §7), so
the state of a handler written on two replicas is one row after merge (the later write of
each column wins).

    db.handler_state.set("wf-1", "counter", {"n": 1}, updated_by_run_id=run_id)
    db.handler_state.get("wf-1", "counter").state        # {'n': 1}

Missing state and a stored JSON `null` differ: `get` returns None for the first and a row
whose `state` is None for the second.

`set_wake_at` changes an existing row only and raises `NotFoundError` otherwise: a wake-up
time without state would make "no state yet" look like a stored `{}`. To create the row and
schedule in one statement, pass `wake_at=` to `set`. A `wake_at` of 0 means "not scheduled".
"""

from __future__ import annotations

from typing import Any

import msgspec

from .database import Database, Session
from .errors import NotFoundError
from .rows import Table, deterministic_id, encode_json, require_text

__all__ = ["HandlerState", "HandlerStateStore", "handler_state_id"]


class HandlerState(msgspec.Struct, frozen=True):
    """One row of `handler_state` (fields are the table's columns, in order); `state` is
    decoded JSON (None for a stored `null`)."""

    id: str
    workflow_id: str
    handler_name: str
    state: Any
    wake_at: int
    updated_at: int
    updated_by_run_id: str


HANDLER_STATE = Table("handler_state", HandlerState, json_columns={"state": None})

_RETURNING = f" RETURNING {', '.join(HANDLER_STATE.columns)}"
_UPSERT = (
    "INSERT INTO handler_state (id, workflow_id, handler_name, state, wake_at, updated_at,"
    " updated_by_run_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at,"
    " updated_by_run_id = excluded.updated_by_run_id"
)


def handler_state_id(workflow_id: str, handler_name: str) -> str:
    """The id of a handler's state row, identical on every replica.

    Raises:
        ValueError: workflow_id or handler_name is empty.
    """
    return deterministic_id(require_text("workflow_id", workflow_id), require_text("handler_name", handler_name))


def _check_wake_at(wake_at: int) -> int:
    if isinstance(wake_at, bool) or not isinstance(wake_at, int) or wake_at < 0:
        raise ValueError(f"wake_at must be an integer number of ms >= 0 (0 = not scheduled), got {wake_at!r}")
    return wake_at


class HandlerStateStore:
    """Handler state of every workflow in one replica. Reached as `db.handler_state`."""

    table = HANDLER_STATE

    def __init__(self, db: Database):
        self.db = db

    # -- reading -------------------------------------------------------------------------

    def get(self, workflow_id: str, handler_name: str, *, tx: Session | None = None) -> HandlerState | None:
        """The handler's state row, or None if it has never been set.

        Raises:
            ValueError: workflow_id or handler_name is empty.
            CorruptDataError: the stored state is malformed JSON.
        """
        id = handler_state_id(workflow_id, handler_name)
        with self.db.reading(tx) as s:
            return HANDLER_STATE.get(s, id)

    def list_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> list[HandlerState]:
        """Every handler state row of a workflow, ordered by handler name.

        Raises:
            ValueError: workflow_id is empty.
            CorruptDataError: a stored state is malformed JSON.
        """
        require_text("workflow_id", workflow_id)
        with self.db.reading(tx) as s:
            return HANDLER_STATE.query(s, "workflow_id = ?", (workflow_id,), order="handler_name, id")

    def due(self, now_ms: int | None = None, *, limit: int | None = None,
            tx: Session | None = None) -> list[HandlerState]:
        """Rows scheduled to wake at or before `now_ms` (default: the clock), earliest first.

        Raises:
            ValueError: now_ms or limit is negative.
        """
        now = _check_wake_at(self.db.clock.now_ms() if now_ms is None else now_ms)
        with self.db.reading(tx) as s:
            return HANDLER_STATE.query(s, "wake_at > 0 AND wake_at <= ?", (now,), order="wake_at, id", limit=limit)

    # -- writing -------------------------------------------------------------------------

    def set(
        self,
        workflow_id: str,
        handler_name: str,
        state: Any,
        *,
        updated_by_run_id: str = "",
        wake_at: int | None = None,
        tx: Session | None = None,
    ) -> HandlerState:
        """Save the handler's state (insert or replace) and return the row.

        `wake_at` None keeps the stored wake-up time (0 for a new row); an integer sets it.

        Raises:
            ValueError: workflow_id or handler_name is empty, or wake_at is invalid.
            TypeError: state is not JSON-serializable.
        """
        id = handler_state_id(workflow_id, handler_name)
        body = encode_json(state)
        sql = _UPSERT
        if wake_at is not None:
            _check_wake_at(wake_at)
            sql += ", wake_at = excluded.wake_at"
        with self.db.transaction(tx) as s:
            row = s.execute(sql + _RETURNING, (id, workflow_id, handler_name, body, wake_at or 0,
                                               self.db.clock.now_ms(), updated_by_run_id))
        return HANDLER_STATE.row(row[0])

    def set_wake_at(self, workflow_id: str, handler_name: str, wake_at: int, *,
                    tx: Session | None = None) -> HandlerState:
        """Schedule (or with 0, unschedule) the handler's wake-up; return the row.

        Raises:
            ValueError: workflow_id or handler_name is empty, or wake_at is not an int >= 0.
            NotFoundError: the handler has no state row (see the module docstring).
        """
        id = handler_state_id(workflow_id, handler_name)
        _check_wake_at(wake_at)
        with self.db.transaction(tx) as s:
            row = s.execute("UPDATE handler_state SET wake_at = ?, updated_at = ? WHERE id = ?" + _RETURNING,
                            (wake_at, self.db.clock.now_ms(), id))
            if not row:
                error = NotFoundError("handler_state", id)
                error.add_note(f"no state for workflow {workflow_id!r}, handler {handler_name!r}")
                raise error
        return HANDLER_STATE.row(row[0])

    def delete(self, workflow_id: str, handler_name: str, *, tx: Session | None = None) -> int:
        """Delete the handler's state; return 1, or 0 if there was none.

        Raises:
            ValueError: workflow_id or handler_name is empty.
        """
        id = handler_state_id(workflow_id, handler_name)
        with self.db.transaction(tx) as s:
            return HANDLER_STATE.delete(s, "id = ?", (id,))

    def delete_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Delete every handler state row of a workflow; return how many.

        Raises:
            ValueError: workflow_id is empty.
        """
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            return HANDLER_STATE.delete(s, "workflow_id = ?", (workflow_id,))
