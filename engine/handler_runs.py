"""The handler-run store: one row per execution of a workflow handler.

A run moves along two independent axes:

- its **phase** (how far the work got), forward-only per handler type:
  producer ``pending → executing → committed``; consumer ``pending → preparing → prepared →
  mutating → mutated → emitting → committed`` with the shortcut ``prepared → emitting``
  (nothing to mutate);
- its **status** (whether it is still alive): ``active`` until it becomes one of the final
  statuses ``paused:transient | paused:approval | paused:reconciliation | failed:logic |
  failed:internal | committed | crashed``. A paused run is final too: resuming means a retry
  run (``retry_of`` points back at it).

Setting a phase or status to the value it already has is refused with
`InvalidTransitionError`: re-applying a step is a caller bug, and refusing it is what lets
racing writers (threads, processes) produce exactly one winner. The store does not couple
the axes; the execution model (`engine.execution`) decides which phases a run of a given
status may still take.

Runs have no natural key, so their ids are random (`uuid4().hex`, DESIGN.md §7).

    run = db.handler_runs.create(script_run_id="s1", workflow_id="wf", handler_type="consumer",
                                 handler_name="mailer")
    db.handler_runs.set_phase(run.id, "preparing")
    db.handler_runs.append_log(run.id, {"msg": "fetched 3 emails"})
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import msgspec

from .database import Database, Session
from .errors import CorruptDataError
from .rows import EMPTY_IS_NONE, StateMachine, Table, encode_json, require_text

__all__ = [
    "HandlerRun",
    "HandlerRunStore",
    "HANDLER_TYPES",
    "PHASES",
    "STATUSES",
    "FINAL_STATUSES",
]


class HandlerRun(msgspec.Struct, frozen=True):
    """One row of `handler_runs` (fields are the table's columns, in order).

    `prepare_result` is decoded JSON (None when not set); `logs` is the decoded JSON list.
    """

    id: str
    script_run_id: str
    workflow_id: str
    handler_type: str
    handler_name: str
    phase: str
    status: str
    retry_of: str
    mutation_outcome: str
    prepare_result: Any
    input_state: str
    output_state: str
    start_timestamp: int
    end_timestamp: int
    error: str
    error_type: str
    cost: float
    logs: list[Any]


RUNS = Table("handler_runs", HandlerRun, json_columns={"prepare_result": EMPTY_IS_NONE, "logs": None})

HANDLER_TYPES = ("producer", "consumer")

PHASES = {
    "producer": StateMachine("handler_runs", "phase", {
        "pending": ("executing",),
        "executing": ("committed",),
    }),
    "consumer": StateMachine("handler_runs", "phase", {
        "pending": ("preparing",),
        "preparing": ("prepared",),
        "prepared": ("mutating", "emitting"),
        "mutating": ("mutated",),
        "mutated": ("emitting",),
        "emitting": ("committed",),
    }),
}
_ALL_PHASES = frozenset().union(*(machine.states for machine in PHASES.values()))

FINAL_STATUSES = (
    "paused:transient",
    "paused:approval",
    "paused:reconciliation",
    "failed:logic",
    "failed:internal",
    "committed",
    "crashed",
)
STATUSES = StateMachine("handler_runs", "status", {"active": FINAL_STATUSES})


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, got {type(value).__name__}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number, got {type(value).__name__}")
    return float(value)


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an integer (ms), got {type(value).__name__}")
    return value


# The data fields `update` may write, each with the function that validates/encodes it.
# Phase, status, ids, type, name, retry_of, start_timestamp and logs have their own verbs.
_UPDATABLE = {
    "prepare_result": lambda v, f: "" if v is None else encode_json(v),
    "input_state": _text,
    "output_state": _text,
    "error": _text,
    "error_type": _text,
    "mutation_outcome": _text,
    "cost": _number,
    "end_timestamp": _integer,
}


def phase_machine(handler_type: str) -> StateMachine:
    """The phase machine of a handler type.

    Raises:
        ValueError: the type is not 'producer' or 'consumer'.
    """
    if handler_type not in PHASES:
        raise ValueError(f"handler_type must be one of {list(HANDLER_TYPES)}, got {handler_type!r}")
    return PHASES[handler_type]


class HandlerRunStore:
    """Handler runs of every workflow in one replica. Reached as `db.handler_runs`."""

    table = RUNS

    def __init__(self, db: Database):
        self.db = db

    # -- creating ------------------------------------------------------------------------

    def create(
        self,
        *,
        script_run_id: str,
        workflow_id: str,
        handler_type: str,
        handler_name: str,
        input_state: str = "",
        retry_of: str = "",
        phase: str = "pending",
        tx: Session | None = None,
    ) -> HandlerRun:
        """Start a new active run (start_timestamp = now) and return it.

        Raises:
            ValueError: an id or name is empty, the handler type is unknown, or `phase` is
                not a phase of that type.
        """
        require_text("script_run_id", script_run_id)
        require_text("workflow_id", workflow_id)
        require_text("handler_name", handler_name)
        machine = phase_machine(handler_type)
        if phase not in machine.states:
            raise ValueError(f"phase {phase!r} is not a {handler_type} phase ({sorted(machine.states)})")
        with self.db.transaction(tx) as s:
            run = HandlerRun(
                id=uuid4().hex, script_run_id=script_run_id, workflow_id=workflow_id,
                handler_type=handler_type, handler_name=handler_name, phase=phase, status="active",
                retry_of=_text(retry_of, "retry_of"), mutation_outcome="", prepare_result=None,
                input_state=_text(input_state, "input_state"), output_state="",
                start_timestamp=s.now_ms(), end_timestamp=0, error="", error_type="", cost=0.0, logs=[],
            )
            RUNS.insert(s, run)
            return run

    # -- reading -------------------------------------------------------------------------

    def get(self, id: str, *, tx: Session | None = None) -> HandlerRun | None:
        """The run with this id, or None.

        Raises:
            ValueError: id is empty.
            CorruptDataError: a stored JSON column does not decode.
        """
        require_text("id", id)
        with self.db.reading(tx) as s:
            return RUNS.get(s, id)

    def list_by_session(self, script_run_id: str, *, tx: Session | None = None) -> list[HandlerRun]:
        """The runs of one script run, oldest first (start_timestamp, then id)."""
        require_text("script_run_id", script_run_id)
        with self.db.reading(tx) as s:
            return RUNS.query(s, "script_run_id = ?", (script_run_id,), order="start_timestamp, id")

    def list_by_workflow(
        self, workflow_id: str, limit: int | None = None, *, tx: Session | None = None
    ) -> list[HandlerRun]:
        """The runs of one workflow, newest first (start_timestamp DESC, then id DESC), so a
        `limit` keeps the most recent ones.

        Raises:
            ValueError: workflow_id is empty or limit is negative.
        """
        require_text("workflow_id", workflow_id)
        with self.db.reading(tx) as s:
            return RUNS.query(
                s, "workflow_id = ?", (workflow_id,), order="start_timestamp DESC, id DESC", limit=limit
            )

    def incomplete(self, workflow_id: str | None = None, *, tx: Session | None = None) -> list[HandlerRun]:
        """Active runs (of one workflow, or of all), oldest first."""
        where = "status = 'active'"
        params: tuple[str, ...] = ()
        if workflow_id is not None:
            where, params = where + " AND workflow_id = ?", (require_text("workflow_id", workflow_id),)
        with self.db.reading(tx) as s:
            return RUNS.query(s, where, params, order="start_timestamp, id")

    def has_active_run(self, workflow_id: str, *, tx: Session | None = None) -> bool:
        """Whether the workflow has a run whose status is still 'active'."""
        require_text("workflow_id", workflow_id)
        with self.db.reading(tx) as s:
            return s.one(
                "SELECT 1 FROM handler_runs WHERE workflow_id = ? AND status = 'active' LIMIT 1", (workflow_id,)
            ) is not None

    def retry_chain(self, id: str, *, tx: Session | None = None) -> list[HandlerRun]:
        """The run's whole retry family: the original run first, then its retries.

        Walks `retry_of` up to the earliest run still present, then lists that run's
        descendants breadth-first, each generation ordered by (start_timestamp, id). A linear
        chain therefore comes out oldest → newest. Two retries of one run (possible when two
        replicas retried it while partitioned) both appear, in the same generation.

        Raises:
            NotFoundError: no run has this id.
        """
        require_text("id", id)
        with self.db.reading(tx) as s:
            root = RUNS.require(s, id)
            seen = {root.id}
            while root.retry_of and root.retry_of not in seen:
                parent = RUNS.get(s, root.retry_of)
                if parent is None:  # deleted, or not synced here yet
                    break
                seen.add(parent.id)
                root = parent
            chain, position, seen = [root], 0, {root.id}
            while position < len(chain):
                children = RUNS.query(s, "retry_of = ?", (chain[position].id,), order="start_timestamp, id")
                chain.extend(child for child in children if child.id not in seen)
                seen.update(child.id for child in children)
                position += 1
            return chain

    # -- mutating ------------------------------------------------------------------------

    def update(self, id: str, /, *, tx: Session | None = None, **fields: Any) -> HandlerRun:
        """Write data fields of a run and return it. `prepare_result` is any JSON value
        (None clears it).

        Raises:
            ValueError: no fields, or a field that is not a data field (named).
            TypeError: a value of the wrong type, or a prepare_result JSON cannot hold.
            NotFoundError: no run has this id.
        """
        require_text("id", id)
        if not fields:
            raise ValueError("update() needs at least one field")
        for name in fields:
            if name not in _UPDATABLE:
                raise ValueError(f"handler_runs field {name!r} cannot be set with update(); "
                                 f"data fields are {sorted(_UPDATABLE)}")
        encoded = {name: _UPDATABLE[name](value, name) for name, value in fields.items()}
        with self.db.transaction(tx) as s:
            RUNS.update(s, id, **encoded)
            return RUNS.require(s, id)

    def append_log(self, id: str, entry: Any, *, tx: Session | None = None) -> HandlerRun:
        """Append one JSON value to the run's log list.

        Read-modify-write of one column: two replicas appending concurrently keep only one
        replica's list after merge (last writer wins per column), so logs are a local
        diagnostic, not a ledger.

        Raises:
            NotFoundError: no run has this id.
            TypeError: JSON cannot hold `entry`.
            CorruptDataError: the stored log list does not decode or is not a list.
        """
        require_text("id", id)
        encode_json(entry)  # refuse before taking the write lock
        with self.db.transaction(tx) as s:
            run = RUNS.require(s, id)
            if not isinstance(run.logs, list):
                raise CorruptDataError("handler_runs", id, "logs", f"expected a JSON list, found {run.logs!r:.60}")
            RUNS.update(s, id, logs=encode_json([*run.logs, entry]))
            return RUNS.require(s, id)

    def set_phase(self, id: str, phase: str, *, tx: Session | None = None) -> HandlerRun:
        """Move a run one legal step forward in its type's phase machine.

        Raises:
            ValueError: `phase` is not a phase of any handler type.
            NotFoundError: no run has this id.
            InvalidTransitionError: the edge is not allowed for the run's type (including a
                same-phase set and a phase of the other type).
        """
        require_text("id", id)
        if phase not in _ALL_PHASES:
            raise ValueError(f"phase {phase!r} is not one of {sorted(_ALL_PHASES)}")
        with self.db.transaction(tx) as s:
            run = RUNS.require(s, id)
            phase_machine(run.handler_type).check(id, run.phase, phase)
            RUNS.update(s, id, phase=phase)
            return RUNS.require(s, id)

    def set_status(
        self, id: str, status: str, *, error: str = "", error_type: str = "", tx: Session | None = None
    ) -> HandlerRun:
        """End an active run with a final status; end_timestamp = now. A non-empty `error` /
        `error_type` is recorded (empty ones keep what was there).

        Raises:
            ValueError: `status` is not a run status.
            NotFoundError: no run has this id.
            InvalidTransitionError: the run is not active (every other status is final).
        """
        require_text("id", id)
        STATUSES.require_state(status)
        fields: dict[str, Any] = {"status": status}
        if _text(error, "error"):
            fields["error"] = error
        if _text(error_type, "error_type"):
            fields["error_type"] = error_type
        with self.db.transaction(tx) as s:
            run = RUNS.require(s, id)
            STATUSES.check(id, run.status, status)
            RUNS.update(s, id, **fields, end_timestamp=s.now_ms())
            return RUNS.require(s, id)

    # -- deleting ------------------------------------------------------------------------

    def delete_by_session(self, script_run_id: str, *, tx: Session | None = None) -> int:
        """Delete the runs of one script run; return how many."""
        require_text("script_run_id", script_run_id)
        with self.db.transaction(tx) as s:
            return RUNS.delete(s, "script_run_id = ?", (script_run_id,))

    def delete_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Delete the runs of one workflow; return how many."""
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            return RUNS.delete(s, "workflow_id = ?", (workflow_id,))
