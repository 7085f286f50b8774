"""The mutation store: the one side effect a consumer run performs on the outside world.

A run has at most one mutation, so the mutation's id is derived from the run's id
(`deterministic_id(handler_run_id)`): the same mutation recorded on two replicas is one row
after merge, and a second `create_in_flight` for a run is refused.

Status machine (`STATUSES`)::

    pending ──> in_flight ──> applied | failed                (final)
                    │
                    ├──> needs_reconcile ──> applied | failed | indeterminate | needs_reconcile
                    └──> indeterminate ──> applied | failed   (a user's `resolve`)

`needs_reconcile` means "we do not know whether the call took effect; ask the tool again at
`next_reconcile_at`". `reconcile_attempts` is a read-modify-write counter: under
last-writer-wins two replicas counting at once converge to one of their values, not the sum,
so it is a local hint for back-off, never a billing figure.

    m = db.mutations.create_in_flight(handler_run_id=run.id, workflow_id="wf",
                                      tool_namespace="gmail", tool_method="send", params={"to": "a@b"})
    db.mutations.mark_applied(m.id, {"message_id": "x1"})
"""

from __future__ import annotations

from typing import Any

import msgspec

from .database import Database, Session
from .errors import AlreadyExistsError, InvalidTransitionError
from .rows import EMPTY_IS_NONE, StateMachine, Table, deterministic_id, encode_json, require_text

__all__ = ["Mutation", "MutationStore", "STATUSES", "FINAL_STATUSES", "mutation_id"]


class Mutation(msgspec.Struct, frozen=True):
    """One row of `mutations` (fields are the table's columns, in order).

    `params` is decoded JSON; `result` is decoded JSON or None when there is none yet.
    """

    id: str
    handler_run_id: str
    workflow_id: str
    tool_namespace: str
    tool_method: str
    params: Any
    idempotency_key: str
    status: str
    result: Any
    error: str
    reconcile_attempts: int
    last_reconcile_at: int
    next_reconcile_at: int
    resolved_by: str
    resolved_at: int
    ui_title: str
    created_at: int
    updated_at: int


MUTATIONS = Table("mutations", Mutation, json_columns={"params": None, "result": EMPTY_IS_NONE})

STATUSES = StateMachine("mutations", "status", {
    "pending": ("in_flight",),
    "in_flight": ("applied", "failed", "needs_reconcile", "indeterminate"),
    "needs_reconcile": ("applied", "failed", "indeterminate", "needs_reconcile"),
    "indeterminate": ("applied", "failed"),
})
FINAL_STATUSES = ("applied", "failed")


def mutation_id(handler_run_id: str) -> str:
    """The id of the mutation of run `handler_run_id`, identical on every replica.

    Raises:
        ValueError: handler_run_id is empty.
    """
    return deterministic_id(require_text("handler_run_id", handler_run_id))


def _ms(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be integer milliseconds, got {type(value).__name__}")
    return value


class MutationStore:
    """Mutations of every workflow in one replica. Reached as `db.mutations`."""

    table = MUTATIONS

    def __init__(self, db: Database):
        self.db = db

    # -- creating ------------------------------------------------------------------------

    def create_in_flight(
        self,
        *,
        handler_run_id: str,
        workflow_id: str,
        tool_namespace: str,
        tool_method: str,
        params: Any,
        idempotency_key: str = "",
        ui_title: str = "",
        tx: Session | None = None,
    ) -> Mutation:
        """Record that the run is about to call a tool, and return the row (status in_flight).

        Raises:
            ValueError: an id, namespace or method is empty.
            TypeError: JSON cannot hold `params`.
            AlreadyExistsError: the run already has its mutation.
        """
        id = mutation_id(handler_run_id)
        require_text("workflow_id", workflow_id)
        require_text("tool_namespace", tool_namespace)
        require_text("tool_method", tool_method)
        encode_json(params)
        with self.db.transaction(tx) as s:
            existing = MUTATIONS.get(s, id)
            if existing is not None:
                raise AlreadyExistsError("mutations", id, f"run {handler_run_id} already has a mutation "
                                                          f"({existing.status})")
            now = s.now_ms()
            mutation = Mutation(
                id=id, handler_run_id=handler_run_id, workflow_id=workflow_id, tool_namespace=tool_namespace,
                tool_method=tool_method, params=params, idempotency_key=idempotency_key, status="in_flight",
                result=None, error="", reconcile_attempts=0, last_reconcile_at=0, next_reconcile_at=0,
                resolved_by="", resolved_at=0, ui_title=ui_title, created_at=now, updated_at=now,
            )
            MUTATIONS.insert(s, mutation)
            return mutation

    # -- reading -------------------------------------------------------------------------

    def get(self, id: str, *, tx: Session | None = None) -> Mutation | None:
        """The mutation with this id, or None.

        Raises:
            ValueError: id is empty.
            CorruptDataError: params or result does not decode.
        """
        require_text("id", id)
        with self.db.reading(tx) as s:
            return MUTATIONS.get(s, id)

    def get_by_run(self, handler_run_id: str, *, tx: Session | None = None) -> Mutation | None:
        """The mutation of a run (found by its derived id), or None."""
        return self.get(mutation_id(handler_run_id), tx=tx)

    def due_for_reconciliation(self, limit: int = 100, *, tx: Session | None = None) -> list[Mutation]:
        """Mutations in needs_reconcile whose next_reconcile_at has come (<= now), most overdue
        first (next_reconcile_at, then created_at, then id)."""
        with self.db.reading(tx) as s:
            return MUTATIONS.query(
                s, "status = 'needs_reconcile' AND next_reconcile_at <= ?", (s.now_ms(),),
                order="next_reconcile_at, created_at, id", limit=limit,
            )

    def list_by_workflow(
        self, workflow_id: str, status: str | None = None, *, tx: Session | None = None
    ) -> list[Mutation]:
        """The mutations of a workflow (optionally of one status), oldest first.

        Raises:
            ValueError: workflow_id is empty or status is not a mutation status.
        """
        where, params = "workflow_id = ?", [require_text("workflow_id", workflow_id)]
        if status is not None:
            where += " AND status = ?"
            params.append(STATUSES.require_state(status))
        with self.db.reading(tx) as s:
            return MUTATIONS.query(s, where, params, order="created_at, id")

    # -- status transitions --------------------------------------------------------------

    def _move(self, id: str, status: str, tx: Session | None, **fields: Any) -> Mutation:
        """Check the edge and write the new status with `fields`, atomically."""
        require_text("id", id)
        with self.db.transaction(tx) as s:
            current = MUTATIONS.require(s, id)
            STATUSES.check(id, current.status, status)
            MUTATIONS.update(s, id, status=status, updated_at=s.now_ms(), **fields)
            return MUTATIONS.require(s, id)

    def mark_in_flight(self, id: str, *, tx: Session | None = None) -> Mutation:
        """pending → in_flight (for a mutation recorded before it was dispatched).

        Raises:
            NotFoundError, InvalidTransitionError.
        """
        return self._move(id, "in_flight", tx)

    def mark_applied(self, id: str, result: Any, *, tx: Session | None = None) -> Mutation:
        """The tool call took effect; store its JSON result.

        Raises:
            NotFoundError: no such mutation.
            InvalidTransitionError: it is not in_flight, needs_reconcile or indeterminate.
            TypeError: JSON cannot hold `result`.
        """
        return self._move(id, "applied", tx, result="" if result is None else encode_json(result))

    def mark_failed(self, id: str, error: str, *, tx: Session | None = None) -> Mutation:
        """The tool call certainly did not take effect.

        Raises:
            NotFoundError, InvalidTransitionError.
        """
        return self._move(id, "failed", tx, error=str(error))

    def mark_needs_reconcile(self, id: str, *, next_reconcile_at: int, tx: Session | None = None) -> Mutation:
        """The outcome is unknown; ask the tool again at `next_reconcile_at` (ms).

        Raises:
            NotFoundError, InvalidTransitionError, TypeError (next_reconcile_at not an int).
        """
        return self._move(id, "needs_reconcile", tx, next_reconcile_at=_ms(next_reconcile_at, "next_reconcile_at"))

    def mark_indeterminate(self, id: str, error: str, *, tx: Session | None = None) -> Mutation:
        """Reconciliation gave up: a user must say what happened (`resolve`).

        Raises:
            NotFoundError, InvalidTransitionError.
        """
        return self._move(id, "indeterminate", tx, error=str(error), next_reconcile_at=0)

    def record_reconcile_attempt(self, id: str, *, next_reconcile_at: int, tx: Session | None = None) -> Mutation:
        """One more inconclusive reconciliation: attempts + 1, last_reconcile_at = now, status
        needs_reconcile and the next try at `next_reconcile_at`. Taken from in_flight (the first
        inconclusive check, e.g. after a crash) or needs_reconcile.

        Raises:
            NotFoundError, InvalidTransitionError, TypeError.
        """
        next_at = _ms(next_reconcile_at, "next_reconcile_at")
        require_text("id", id)
        with self.db.transaction(tx) as s:
            current = MUTATIONS.require(s, id)
            STATUSES.check(id, current.status, "needs_reconcile")
            now = s.now_ms()
            MUTATIONS.update(
                s, id, status="needs_reconcile", reconcile_attempts=current.reconcile_attempts + 1,
                last_reconcile_at=now, next_reconcile_at=next_at, updated_at=now,
            )
            return MUTATIONS.require(s, id)

    def resolve(self, id: str, *, status: str, resolved_by: str, tx: Session | None = None) -> Mutation:
        """A user's verdict on an indeterminate mutation: applied or failed.

        Raises:
            ValueError: status is not 'applied' or 'failed', or resolved_by is empty.
            NotFoundError: no such mutation.
            InvalidTransitionError: the mutation is not indeterminate.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"resolve() status must be 'applied' or 'failed', got {status!r}")
        require_text("resolved_by", resolved_by)
        require_text("id", id)
        with self.db.transaction(tx) as s:
            current = MUTATIONS.require(s, id)
            if current.status != "indeterminate":  # the machine allows more; a verdict only this
                raise InvalidTransitionError("mutations", id, "status", current.status, status)
            now = s.now_ms()
            MUTATIONS.update(s, id, status=status, resolved_by=resolved_by, resolved_at=now, updated_at=now)
            return MUTATIONS.require(s, id)

    # -- deleting ------------------------------------------------------------------------

    def delete_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Delete the mutations of one workflow; return how many."""
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            return MUTATIONS.delete(s, "workflow_id = ?", (workflow_id,))
