"""The execution model: moves handler runs through their phases, each step ONE transaction
across the stores (runs, events, mutations, handler state).

A consumer run::

    prepare_consumer   pending|preparing → prepared, reserve its input events, record them
    begin_mutation     prepared → mutating, mutation in_flight           ─┐ the mutation
    apply_mutation     mutating → mutated, mutation applied, outcome 'success'  │ boundary
    fail_mutation      mutating → mutated, mutation failed, outcome 'failure', events released
    (handler)          set_phase(..., 'emitting'), publish output events with tx=
    commit_consumer    prepared|emitting → committed: events consumed, state saved, status committed

A producer run: ``commit_producer`` (pending|executing → committed, state saved).

**Ownership.** On several replicas a workflow is run by its owning replica only
(`db.ownership`, DESIGN.md §7): `start_run`, `prepare_consumer`, `begin_mutation`,
`commit_consumer`, `commit_producer`, `create_retry_run` and `recover_crashed_runs(workflow)`
raise `NotOwnerError` on another replica, and claim an unowned workflow on first use. Ending a
run (`fail_run`) and recording what a started tool call did (`apply_mutation`,
`fail_mutation`) work everywhere: a fact about the outside world must never be refused.
Publishing and reading are not restricted. `check_invariants()` lists what is inconsistent
(engine/invariants.py); the after-merge audit (engine/replication.py) repairs what merges break.

**The mutation boundary.** Until a consumer run begins its mutation nothing outside the
engine has happened, so ending it (``fail_run``, crash recovery) releases its events for a
fresh run. From ``mutating`` on, the side effect may have happened: the events stay reserved,
and ``create_retry_run`` starts a new run at ``emitting`` that takes them over, so the input is
never processed twice and never dropped. A ``paused:*`` status is final too; resuming means a
retry run.

Every method accepts ``tx=`` and nests as a savepoint inside it; without it each is its own
transaction. Any error inside rolls the whole step back: either all stores moved or none did.

    run = db.handler_runs.create(script_run_id="s", workflow_id="wf", handler_type="consumer",
                                 handler_name="mailer")
    db.execution.prepare_consumer(run.id, reservations={"inbox": ["m1"]}, prepare_result={"n": 1})
    m = db.execution.begin_mutation(run.id, tool_namespace="mail", tool_method="send", params={})
    db.execution.apply_mutation(m.id, {"sent": True})
    db.handler_runs.set_phase(run.id, "emitting")
    db.execution.commit_consumer(run.id, state={"seen": 1})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from .database import Database, Session
from .errors import AlreadyExistsError, InvalidTransitionError, NotFoundError
from .handler_runs import FINAL_STATUSES, STATUSES, HandlerRun
from .mutations import FINAL_STATUSES as MUTATION_FINAL_STATUSES
from .mutations import Mutation

__all__ = ["ExecutionModel", "RecoverySummary", "UNSET", "PRE_MUTATION_PHASES", "FAILURE_STATUSES", "PhasedRun"]

if TYPE_CHECKING:
    from .invariants import Violation


class _Unset:
    """The type of `UNSET`: "no new handler state" (None would be a real JSON null)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()

# Consumer phases before the mutation boundary: ending a run here releases its events.
PRE_MUTATION_PHASES = ("pending", "preparing", "prepared")
# The statuses `fail_run` may set (every final status but committed).
FAILURE_STATUSES = tuple(status for status in FINAL_STATUSES if status != "committed")


class RecoverySummary(msgspec.Struct, frozen=True):
    """What `recover_crashed_runs` did: run ids by new status, and event counts."""

    paused_for_reconciliation: list[str]
    crashed: list[str]
    events_released: int
    events_kept_reserved: int


class PhasedRun(Protocol):
    """What `past_mutation_boundary` reads of a run: a `HandlerRun`, or the audit's lighter
    `claims.RunFacts` (read without decoding the run's JSON columns)."""

    @property
    def handler_type(self) -> str: ...

    @property
    def phase(self) -> str: ...


def past_mutation_boundary(run: PhasedRun) -> bool:
    """Whether the run may have performed its side effect (so its events must stay reserved).

    The one statement of this rule: the after-merge audit ranks contested runs with it too."""
    return run.handler_type == "consumer" and run.phase not in PRE_MUTATION_PHASES


def _message_ids(topic: str, ids: Any) -> list[str]:
    """The message ids asked for one topic; a bare string would be read as its characters.

    Raises:
        ValueError: `ids` is a string rather than a collection of message ids.
    """
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"reservations[{topic!r}] must be a list of message ids, not a string")
    return list(ids)


class ExecutionModel:
    """Run-phase transitions across the stores of one replica. Reached as `db.execution`."""

    def __init__(self, db: Database):
        self.db = db

    # -- helpers -----------------------------------------------------------------------------

    def _run(self, s: Session, run_id: str, handler_type: str | None = None) -> HandlerRun:
        run = self.db.handler_runs.get(run_id, tx=s)
        if run is None:
            raise NotFoundError("handler_runs", run_id)
        if handler_type is not None and run.handler_type != handler_type:
            raise ValueError(f"run {run_id!r} is a {run.handler_type} run; this step needs a {handler_type} run")
        return run

    @staticmethod
    def _require_active(run: HandlerRun) -> None:
        if run.status != "active":
            raise InvalidTransitionError("handler_runs", run.id, "status", run.status, "active",
                                         "the run has ended; resuming means a retry run")

    def _finish(self, s: Session, run: HandlerRun, state: Any, output_state: str) -> HandlerRun:
        """Save state and output, then phase and status committed (end_timestamp = now)."""
        if state is not UNSET:
            self.db.handler_state.set(run.workflow_id, run.handler_name, state, updated_by_run_id=run.id, tx=s)
        if output_state:
            self.db.handler_runs.update(run.id, output_state=output_state, tx=s)
        self.db.handler_runs.set_phase(run.id, "committed", tx=s)
        return self.db.handler_runs.set_status(run.id, "committed", tx=s)

    def _owned(self, s: Session, workflow_id: str) -> None:
        """Refuse to run another replica's workflow; claim an unowned one (first use)."""
        self.db.ownership.require_local(workflow_id, tx=s)

    def _schedule(self, s: Session, run: HandlerRun, wake_at: int) -> None:
        """Set the handler's wake-up time; a handler without state gets a row whose state is
        JSON null (what it reads as "no state" anyway)."""
        store = self.db.handler_state
        if store.get(run.workflow_id, run.handler_name, tx=s) is None:
            store.set(run.workflow_id, run.handler_name, None, updated_by_run_id=run.id, wake_at=wake_at, tx=s)
        else:
            store.set_wake_at(run.workflow_id, run.handler_name, wake_at, tx=s)

    # -- starting ----------------------------------------------------------------------------

    def start_run(
        self,
        *,
        script_run_id: str,
        workflow_id: str,
        handler_type: str,
        handler_name: str,
        input_state: str = "",
        tx: Session | None = None,
    ) -> HandlerRun:
        """Start a new active run of a workflow this replica owns (claimed if unowned); return it.

        Raises:
            NotOwnerError: another replica owns the workflow.
            ValueError: an empty id or name, or an unknown handler type.
        """
        with self.db.transaction(tx) as s:
            self._owned(s, workflow_id)
            return self.db.handler_runs.create(script_run_id=script_run_id, workflow_id=workflow_id,
                                               handler_type=handler_type, handler_name=handler_name,
                                               input_state=input_state, tx=s)

    # -- consumer ----------------------------------------------------------------------------

    def prepare_consumer(
        self,
        run_id: str,
        *,
        reservations: Mapping[str, Iterable[str]],
        prepare_result: Any,
        wake_at: int | None = None,
        tx: Session | None = None,
    ) -> HandlerRun:
        """Reserve the run's input events and record the preparation; return the run.

        The stored `prepare_result` is ``{"result": prepare_result, "reservations": {topic:
        [message ids asked for]}, "reserved_event_ids": [event ids actually reserved]}`` so
        the run (and an after-merge audit) knows exactly which events it holds. Events that
        are not pending (taken by another run) are simply not reserved.

        Raises:
            NotFoundError: no such run.
            ValueError: not a consumer run, or an empty topic name / message id.
            InvalidTransitionError: the run is not active, or not at pending or preparing.
            TypeError: JSON cannot hold `prepare_result`.
            NotOwnerError: another replica owns the run's workflow.
        """
        with self.db.transaction(tx) as s:
            run = self._run(s, run_id, "consumer")
            self._require_active(run)
            self._owned(s, run.workflow_id)
            runs = self.db.handler_runs
            if run.phase == "pending":
                runs.set_phase(run_id, "preparing", tx=s)
            runs.set_phase(run_id, "prepared", tx=s)
            asked = {topic: _message_ids(topic, ids) for topic, ids in reservations.items()}
            reserved = self.db.events.reserve(run_id, run.workflow_id, asked, tx=s)
            if wake_at is not None:
                self._schedule(s, run, wake_at)
            record = {"result": prepare_result, "reservations": asked, "reserved_event_ids": reserved}
            return runs.update(run_id, prepare_result=record, tx=s)

    def commit_consumer(
        self, run_id: str, *, state: Any = UNSET, output_state: str = "", tx: Session | None = None
    ) -> HandlerRun:
        """Finish a consumer run: consume its reserved events, save the handler state (unless
        UNSET), record `output_state`, phase and status committed. Returns the run.

        Raises:
            NotFoundError: no such run.
            ValueError: not a consumer run.
            InvalidTransitionError: the run is not active (a second commit included), or not at
                prepared or emitting.
            TypeError: JSON cannot hold `state` (nothing is written).
            NotOwnerError: another replica owns the run's workflow.
        """
        with self.db.transaction(tx) as s:
            run = self._run(s, run_id, "consumer")
            STATUSES.check(run.id, run.status, "committed")
            self._owned(s, run.workflow_id)
            if run.phase not in ("prepared", "emitting"):
                raise InvalidTransitionError("handler_runs", run.id, "phase", run.phase, "committed",
                                             "a consumer commits from prepared or emitting")
            if run.phase == "prepared":
                self.db.handler_runs.set_phase(run_id, "emitting", tx=s)
            self.db.events.consume(run_id, tx=s)
            return self._finish(s, run, state, output_state)

    # -- producer ----------------------------------------------------------------------------

    def commit_producer(
        self, run_id: str, *, state: Any = UNSET, output_state: str = "", tx: Session | None = None
    ) -> HandlerRun:
        """Finish a producer run (at pending or executing): save the handler state (unless
        UNSET), record `output_state`, phase and status committed. Publish its events with
        the same `tx=` to make them part of the commit. Returns the run.

        Raises:
            NotFoundError: no such run.
            ValueError: not a producer run.
            InvalidTransitionError: the run is not active (a second commit included) or already
                at committed.
            TypeError: JSON cannot hold `state`.
            NotOwnerError: another replica owns the run's workflow.
        """
        with self.db.transaction(tx) as s:
            run = self._run(s, run_id, "producer")
            STATUSES.check(run.id, run.status, "committed")
            self._owned(s, run.workflow_id)
            if run.phase == "pending":
                self.db.handler_runs.set_phase(run_id, "executing", tx=s)
            return self._finish(s, run, state, output_state)

    # -- the mutation ------------------------------------------------------------------------

    def begin_mutation(self, run_id: str, *, tx: Session | None = None, **mutation: Any) -> Mutation:
        """Cross the mutation boundary: phase prepared → mutating and the run's mutation
        recorded in_flight (`mutation` are `create_in_flight`'s tool_namespace, tool_method,
        params, idempotency_key, ui_title). Returns the mutation.

        Raises:
            NotFoundError: no such run.
            ValueError: not a consumer run, or an empty tool namespace/method.
            InvalidTransitionError: the run is not active or not at prepared.
            AlreadyExistsError: the run already has a mutation.
            NotOwnerError: another replica owns the run's workflow.
        """
        with self.db.transaction(tx) as s:
            run = self._run(s, run_id, "consumer")
            self._require_active(run)
            self._owned(s, run.workflow_id)
            self.db.handler_runs.set_phase(run_id, "mutating", tx=s)
            return self.db.mutations.create_in_flight(
                handler_run_id=run_id, workflow_id=run.workflow_id, tx=s, **mutation)

    def _settle_mutation(self, s: Session, mutation: Mutation, outcome: str) -> HandlerRun:
        """Record the outcome on the run and move it mutating → mutated. The run may have been
        paused for reconciliation meanwhile: its phase still records what happened."""
        run = self._run(s, mutation.handler_run_id)
        self.db.handler_runs.update(run.id, mutation_outcome=outcome, tx=s)
        return self.db.handler_runs.set_phase(run.id, "mutated", tx=s)

    def apply_mutation(self, mutation_id: str, result: Any, *, tx: Session | None = None) -> Mutation:
        """The tool call took effect: mutation applied with `result`, run outcome 'success',
        phase mutated. Returns the mutation.

        Raises:
            NotFoundError: no such mutation, or its run is gone.
            InvalidTransitionError: the mutation is already final, or the run is not at mutating.
        """
        with self.db.transaction(tx) as s:
            mutation = self.db.mutations.mark_applied(mutation_id, result, tx=s)
            self._settle_mutation(s, mutation, "success")
            return mutation

    def fail_mutation(self, mutation_id: str, error: str, *, tx: Session | None = None) -> Mutation:
        """The tool call certainly did not take effect: mutation failed, run outcome
        'failure', phase mutated, and the run's events released (nothing happened, so another
        run may process them). Returns the mutation.

        Raises:
            NotFoundError: no such mutation, or its run is gone.
            InvalidTransitionError: the mutation is already final, or the run is not at mutating.
        """
        with self.db.transaction(tx) as s:
            mutation = self.db.mutations.mark_failed(mutation_id, error, tx=s)
            run = self._settle_mutation(s, mutation, "failure")
            self.db.events.release(run.id, tx=s)
            return mutation

    # -- ending and resuming -----------------------------------------------------------------

    def fail_run(
        self, run_id: str, status: str, *, error: str = "", error_type: str = "", tx: Session | None = None
    ) -> HandlerRun:
        """End an active run with a failure or pause status. Before the mutation boundary its
        events are released (attempt_number + 1); after it they stay reserved for a retry run.
        Returns the run.

        Raises:
            ValueError: `status` is not one of FAILURE_STATUSES.
            NotFoundError: no such run.
            InvalidTransitionError: the run is not active.
        """
        if status not in FAILURE_STATUSES:
            raise ValueError(f"fail_run status must be one of {list(FAILURE_STATUSES)}, got {status!r}")
        with self.db.transaction(tx) as s:
            run = self.db.handler_runs.set_status(run_id, status, error=error, error_type=error_type, tx=s)
            if not past_mutation_boundary(run):
                self.db.events.release(run_id, tx=s)
            return run

    def create_retry_run(self, failed_run_id: str, *, tx: Session | None = None) -> HandlerRun:
        """Resume an ended consumer run that crossed the mutation boundary: a new active run at
        emitting, retry_of the old one, with its input state, prepare_result and mutation
        outcome copied and its reservations transferred. Returns the new run.

        Raises:
            NotFoundError: no such run.
            InvalidTransitionError: the run is active or committed, stopped before the mutation
                boundary (its events were released: a fresh run takes them), or its mutation is
                not resolved yet (applied or failed).
            AlreadyExistsError: the run already has a retry run.
            NotOwnerError: another replica owns the run's workflow.

        The retry's `prepare_result` is the old one, except that `reserved_event_ids` lists only
        the events actually handed over (one lost to another replica's run in a conflict stays
        with that run; see engine/claims.py).
        """
        with self.db.transaction(tx) as s:
            old = self._run(s, failed_run_id)
            if old.status in ("active", "committed"):
                raise InvalidTransitionError("handler_runs", old.id, "status", old.status, "active",
                                             "only an ended, uncommitted run is retried")
            if not past_mutation_boundary(old):
                raise InvalidTransitionError("handler_runs", old.id, "phase", old.phase, "emitting",
                                             "the run stopped before its mutation; a fresh run takes its events")
            self._check_mutation_resolved(s, old)
            self._owned(s, old.workflow_id)
            existing = s.one("SELECT id FROM handler_runs WHERE retry_of = ? LIMIT 1", (old.id,))
            if existing is not None:
                raise AlreadyExistsError("handler_runs", existing[0], f"retry of run {old.id}")
            runs = self.db.handler_runs
            new = runs.create(script_run_id=old.script_run_id, workflow_id=old.workflow_id,
                              handler_type=old.handler_type, handler_name=old.handler_name,
                              input_state=old.input_state, retry_of=old.id, phase="emitting", tx=s)
            held = {event.id for event in self.db.events.reserved_by(old.id, tx=s)}
            new = runs.update(new.id, prepare_result=_handed_over(old.prepare_result, held),
                              mutation_outcome=old.mutation_outcome, tx=s)
            self.db.events.transfer_reservations(old.id, new.id, tx=s)
            return new

    def _check_mutation_resolved(self, s: Session, run: HandlerRun) -> None:
        mutation = self.db.mutations.get_by_run(run.id, tx=s)
        if mutation is not None and mutation.status not in MUTATION_FINAL_STATUSES:
            raise InvalidTransitionError("mutations", mutation.id, "status", mutation.status, "applied",
                                         f"resolve the mutation of run {run.id} before retrying it")

    def recover_crashed_runs(self, workflow_id: str | None = None, *, tx: Session | None = None) -> RecoverySummary:
        """After a restart, end every run still active (of one workflow, or all): one whose
        mutation is unresolved becomes paused:reconciliation (its events stay reserved);
        the others become crashed, releasing their events before the mutation boundary and
        keeping them after it. Call it before any handler runs, for the workflows this
        replica owns: it cannot tell a live run from a dead one. Without a workflow, the
        workflows other replicas own are left alone (their runs may be alive there).

        Raises:
            CorruptDataError: a run or mutation row does not decode.
            NotOwnerError: `workflow_id` is owned by another replica.
        """
        paused: list[str] = []
        crashed: list[str] = []
        released = kept = 0
        with self.db.transaction(tx) as s:
            if workflow_id is not None:
                self._owned(s, workflow_id)
            others = {o.workflow_id for o in self.db.ownership.list(tx=s) if o.owner not in (None, self.db.site_id)}
            for run in self.db.handler_runs.incomplete(workflow_id, tx=s):
                if run.workflow_id in others:
                    continue
                mutation = self.db.mutations.get_by_run(run.id, tx=s)
                note = f"recovered after a restart at phase {run.phase}"
                if mutation is not None and mutation.status not in MUTATION_FINAL_STATUSES:
                    self.db.handler_runs.set_status(run.id, "paused:reconciliation", error=note, tx=s)
                    paused.append(run.id)
                else:
                    self.db.handler_runs.set_status(run.id, "crashed", error=note, tx=s)
                    crashed.append(run.id)
                if past_mutation_boundary(run):
                    kept += len(self.db.events.reserved_by(run.id, tx=s))
                else:
                    released += self.db.events.release(run.id, tx=s)
        return RecoverySummary(paused, crashed, released, kept)

    # -- invariants --------------------------------------------------------------------------

    def check_invariants(self, *, tx: Session | None = None) -> list["Violation"]:
        """What is inconsistent across the stores of this replica, as a list of violations
        naming rule, table and row id (empty when all is well). See engine/invariants.py.

        Raises:
            CorruptDataError: never for run JSON (claims are read with SQLite's JSON functions).
        """
        from .invariants import check

        return check(self.db, tx=tx)


def _handed_over(record: Any, held: set[str]) -> Any:
    """A prepare_result whose reserved_event_ids keeps (in order) only the ids in `held`."""
    if not isinstance(record, dict) or not isinstance(record.get("reserved_event_ids"), list):
        return record
    return {**record, "reserved_event_ids": [e for e in record["reserved_event_ids"] if e in held]}
