"""Running the execution model on several replicas: the after-merge audit.

Reserving an event cannot be exclusive across partitioned replicas. Ownership (engine/
ownership.py) makes only the owning replica reserve a workflow's events, but two replicas can
both believe they own a workflow (concurrent claims while partitioned, a forced takeover while
the old owner is offline). After every merge this audit looks at the rows just merged and

1. repairs runs whose merged columns say both "committed" and not (a commit raced a stop):
   the commit happened, so phase and status become committed;
2. records `non_owner_write`: a run whose phase/status writers (read from cr-sqlite's clock:
   a merged change keeps its origin site) and creator are two replicas, at least one of the
   writers not the workflow's owner. Recorded only: a run handed over between replicas
   in turn is legitimate, and a handover that raced is caught by rules 3 and 4 as well;
3. records `double_reservation`: an event claimed by several runs (engine/claims.py). The
   winner is decided there (committed first, then past its mutation, then the owner's, then
   the oldest); the losers are stopped, and so is the winner if another replica than the
   owner started it (past its mutation it is paused, keeping the event, so the owner resumes
   it with a retry run once its mutation is reconciled; before, it releases the event);
4. records `two_active_runs`: a workflow with active runs started by two replicas. The runs of
   the owning replica (without an owner: of the replica that started the oldest) go on; the
   others are stopped;
5. puts every event it looked at into the state the claims say (status and holder, the same
   values on every replica), releasing what nobody holds any more (a stopped run's events, a
   deleted run's events);
6. re-creates a topic row that a merge deleted while events of it remain (a publish raced the
   delete), with the name kept in `__engine_topic_names`.

**Stopping a run.** An active run before its mutation becomes `crashed`; one past its mutation
becomes `paused:reconciliation` and its in-flight mutation `needs_reconcile` (its side effect
may have happened twice). The error names the conflict; `error_type` is 'conflict'. A stop
never releases an event the run lost: step 5 gives it to the winner.

A conflict row's id comes from its kind and subjects, so the same conflict found on two
replicas is one row after they sync. Every write here is part of the merging transaction.

The audit is on by default: `Database.open` registers it with `db.on_merge` when the file
holds the execution stores' tables (`Database.open(path, audit=False)` opts out).

    db = Database.open("app.db")          # audited
    Peer(db).sync_with(other)             # conflicts land in db.conflicts.list()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import msgspec

from . import claims as c
from .conflicts import Conflict
from .database import Database, Row, Session
from .events import RESERVED
from .execution import past_mutation_boundary
from .handler_runs import RUNS
from .rows import chunks, placeholders
from .topics import insert_topic

__all__ = [
    "AuditReport",
    "CONFLICT_ERROR_TYPE",
    "enable_audit",
    "audit",
    "audit_all",
    "open_conflicts_summary",
]

log = logging.getLogger("engine.replication")

CONFLICT_ERROR_TYPE = "conflict"
_AUDITED = frozenset({"handler_runs", "events", "topics", "ownership"})


class AuditReport(msgspec.Struct):
    """What one audit did (ids, in the order it acted)."""

    conflicts: list[str] = msgspec.field(default_factory=list)  # conflict rows created here
    stopped: list[str] = msgspec.field(default_factory=list)  # runs ended by a conflict
    reconciling: list[str] = msgspec.field(default_factory=list)  # mutations set to needs_reconcile
    repaired_runs: list[str] = msgspec.field(default_factory=list)
    repaired_events: list[str] = msgspec.field(default_factory=list)
    restored_topics: list[str] = msgspec.field(default_factory=list)

    def __bool__(self) -> bool:
        return any(getattr(self, field) for field in self.__struct_fields__)


_Ranking: TypeAlias = Callable[[Iterable[c.Claim]], list[c.Claim]]
"""Sorts the claims on one event, the winner first (claims.rank)."""


class _Scope(msgspec.Struct):
    runs: set[str] = msgspec.field(default_factory=set)
    events: set[str] = msgspec.field(default_factory=set)
    topics: set[str] = msgspec.field(default_factory=set)
    full: set[str] = msgspec.field(default_factory=set)  # workflows audited whole


# -- entry points ----------------------------------------------------------------------------


def enable_audit(db: Database) -> Callable[[], None] | None:
    """Run `audit` inside every transaction that merges received changes into `db`, if it
    holds the execution stores' tables (`Database.open` calls this unless `audit=False`).
    Returns the function that turns it off again, or None for another schema.

    An error from the audit (e.g. a row it cannot interpret) is logged and its writes
    rolled back, but the merge goes on: a bad row must not stop sync for good.
    """
    if not _AUDITED <= set(db.crr_tables):
        return None
    return db.on_merge(_audit_merge)


def _audit_merge(tx: Session, merged: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
    """The `on_merge` listener (module-level: it keeps no database alive)."""
    try:
        audit(tx.db, merged, tx=tx)
    except Exception:  # a bug in the audit must not make every retry of this merge fail
        log.exception("after-merge audit of %s failed; the merge is kept", tx.db.path)


def audit(db: Database, merged: Iterable[tuple[str, tuple[Any, ...]]], *, tx: Session | None = None) -> AuditReport:
    """Audit the rows a merge touched: `merged` lists (table, primary-key values), as sync's
    after-apply hook passes them. Rows of other tables are ignored. Returns what it did."""
    scope = _Scope()
    for table, pk in merged:
        if table not in _AUDITED or not pk:
            continue
        key = str(pk[0])
        {"handler_runs": scope.runs, "events": scope.events, "topics": scope.topics, "ownership": scope.full}[table].add(key)
    return _run(db, scope, tx)


def audit_all(db: Database, *, tx: Session | None = None) -> AuditReport:
    """Audit every workflow of the replica (e.g. after an import made without the hook)."""
    with db.reading(tx) as s:
        workflows = {r[0] for r in s.execute(
            "SELECT workflow_id FROM handler_runs UNION SELECT workflow_id FROM events"
            " UNION SELECT workflow_id FROM ownership")}
        topics = {r[0] for r in s.execute("SELECT DISTINCT topic_id FROM events")}
    return _run(db, _Scope(topics=topics, full=workflows), tx)


def open_conflicts_summary(db: Database) -> list[str]:
    """Lines for a status display: the count of open conflicts, then one line each."""
    conflicts = db.conflicts.list(status="open")
    lines = [f"open conflicts: {len(conflicts)}"]
    for conflict in conflicts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(conflict.detected_at / 1000))
        lines.append(f"  {conflict.id}  {conflict.kind}  workflow {conflict.workflow_id}: "
                     f"{', '.join(conflict.subjects)} (detected {when} UTC by {conflict.detected_by})")
    return lines


def _run(db: Database, scope: _Scope, tx: Session | None) -> AuditReport:
    with db.transaction(tx) as s:
        auditor = _Audit(db, s)
        auditor.run(scope)
        report = auditor.report
    if report:
        log.info("after-merge audit of %s: %s", db.path, report)
    return report


# -- the audit ---------------------------------------------------------------------------------


class _Audit:
    def __init__(self, db: Database, s: Session):
        self.db, self.s = db, s
        self.report = AuditReport()
        self.stopped: set[str] = set()

    def run(self, scope: _Scope) -> None:
        alive = c.load_runs(self.s, scope.runs)
        # Events held by a touched run (alive, or deleted by the merge) need a look too.
        held = set(self._ids("SELECT id FROM events WHERE reserved_by_run_id IN ({})", scope.runs))
        events = self._event_workflows(scope.events | held)
        workflows = {r.workflow_id for r in alive.values()} | set(events.values()) | scope.full
        for wf in sorted(w for w in workflows if w):
            runs = [r for r in alive.values() if r.workflow_id == wf]
            if wf in scope.full:
                runs = c.load_workflow_runs(self.s, wf)
            self._workflow(wf, runs, {e for e, w in events.items() if w == wf}, full=wf in scope.full)
        topics = scope.topics | set(self._ids("SELECT DISTINCT topic_id FROM events WHERE id IN ({})", scope.events))
        self._restore_topics(topics)

    def _workflow(self, wf: str, runs: list[c.RunFacts], events: set[str], *, full: bool) -> None:
        owner = self.db.ownership.owner(wf, tx=self.s)
        runs = self._repair_runs(runs)
        self._non_owner_writes(wf, runs, owner)
        self._reservations(wf, runs, events, owner, full=full)

    # -- 1. runs that are committed on one side only ----------------------------------------

    def _repair_runs(self, runs: list[c.RunFacts]) -> list[c.RunFacts]:
        mixed = [r for r in runs if (r.phase == "committed") != (r.status == "committed")]
        for run in mixed:
            RUNS.update(self.s, run.id, phase="committed", status="committed")
            self.report.repaired_runs.append(run.id)
        if not mixed:
            return runs
        fresh = c.load_runs(self.s, [r.id for r in runs])
        return [fresh[r.id] for r in runs if r.id in fresh]

    # -- 2. a run changed by two replicas ----------------------------------------------------

    def _non_owner_writes(self, wf: str, runs: list[c.RunFacts], owner: str | None) -> None:
        if owner is None or not runs:
            return
        writers = c.column_writers(self.s, "handler_runs", [r.id for r in runs], ["phase", "status", "script_run_id"])
        for run in runs:
            creator = writers.get((run.id, "script_run_id"))
            phase_by, status_by = writers.get((run.id, "phase")), writers.get((run.id, "status"))
            wrote = {phase_by} if run.error_type == CONFLICT_ERROR_TYPE else {phase_by, status_by}
            wrote.discard(None)
            if len(wrote | ({creator} - {None})) < 2 or all(site == owner for site in wrote):
                continue
            detail = {"run": run.id, "created_by": creator, "phase_written_by": phase_by,
                      "status_written_by": status_by, "owner": owner, "phase": run.phase, "status": run.status}
            self._record("non_owner_write", wf, [run.id], detail)

    # -- 4. active runs started by two replicas ----------------------------------------------

    def _two_active_runs(self, wf: str, owner: str | None) -> None:
        made_by = c.active_creators(self.s, wf)
        if len(set(made_by.values())) < 2:
            return
        active = c.load_workflow_runs(self.s, wf, "status = 'active'")
        keep = owner if owner is not None else made_by.get(active[0].id)
        detail = {"runs": {r.id: made_by.get(r.id) for r in active}, "kept_replica": keep, "owner": owner}
        conflict = self._record("two_active_runs", wf, [r.id for r in active], detail)
        for run in active:
            if made_by.get(run.id) != keep:
                self._stop(run, conflict, f"workflow {wf} is run by replica {keep}")

    # -- 3 and 5. reservations ---------------------------------------------------------------

    def _reservations(self, wf: str, runs: list[c.RunFacts], events: set[str], owner: str | None, *, full: bool) -> None:
        """Rules 3 (double reservations), 4 (active runs of two replicas) and 5 (event repair)."""
        listing = c.listed_events(self.s, wf)
        by_run: dict[str, set[str]] = {}
        for event, ids in listing.items():
            for run_id in ids:
                by_run.setdefault(run_id, set()).add(event)
        scope = set(events)
        for run in runs:
            scope |= by_run.get(run.id, set())
        if full:
            scope |= set(listing) | set(self._ids("SELECT id FROM events WHERE workflow_id = ? AND status = ?", [],
                                                  (wf, RESERVED)))
        claims, _state, made_by, ranked = self._claims(scope, listing, owner)
        for event in sorted(claims):
            found = ranked(claims[event])
            if len(found) < 2:
                continue
            winner, losers = found[0], found[1:]
            detail = {"event": event, "winner": winner.run.id, "losers": [k.run.id for k in losers],
                      "claims": {k.run.id: k.kind for k in found}, "owner": owner}
            conflict = self._record("double_reservation", wf, [event, *(k.run.id for k in found)], detail)
            for loser in losers:
                self._stop(loser.run, conflict, f"event {event} belongs to run {winner.run.id}")
            if owner is not None and made_by.get(winner.run.id) != owner:
                self._stop(winner.run, conflict, f"event {event} is contested; the owner {owner} resumes it")
        if runs or full:  # only runs merged (or a new owner) can make two replicas' runs active
            self._two_active_runs(wf, owner)
        scope |= self._of_stopped(wf, by_run)
        claims, state, _made_by, ranked = self._claims(scope, listing, owner)
        for event in sorted(claims):
            found = ranked(claims[event])
            self._repair_event(event, *state[event], found[0] if found else None)

    def _claims(self, scope: set[str], listing: dict[str, list[str]], owner: str | None) -> tuple[
        dict[str, list[c.Claim]], dict[str, tuple[str, str]], dict[str, str], _Ranking
    ]:
        """For the events in `scope`: claims per event, (status, holder) per event, the
        creating site of every contested run, and a function sorting claims winner first."""
        state = {id: (status, holder) for id, status, holder in self._rows(
            "SELECT id, status, reserved_by_run_id FROM events WHERE id IN ({})", scope)}
        named = {r for e in state for r in listing.get(e, ())} | {h for _s, h in state.values() if h}
        runs = c.load_runs(self.s, named)
        claims = c.claimants(state, listing, runs, c.retried(self.s, runs))
        contested = [k.run for found in claims.values() if len(found) > 1 for k in found]
        roots = c.lineage_roots(self.s, contested)
        made_by = c.creators(self.s, [run.id for run in contested])
        return claims, state, made_by, lambda found: sorted(found, key=lambda k: c.rank(k, owner, roots, made_by))

    def _of_stopped(self, wf: str, by_run: dict[str, set[str]]) -> set[str]:
        """Events of workflow `wf` recorded or held by the runs stopped so far."""
        found = {e for run in self.stopped for e in by_run.get(run, ())}
        return found | set(self._ids("SELECT id FROM events WHERE reserved_by_run_id IN ({}) AND workflow_id = ?",
                                     self.stopped, (wf,)))

    def _repair_event(self, event: str, status: str, holder: str, winner: c.Claim | None) -> None:
        expected = c.expected_event(status, holder, winner)
        if expected == (status, holder):
            return
        self.s.execute("UPDATE events SET status = ?, reserved_by_run_id = ? WHERE id = ?", (*expected, event))
        self.report.repaired_events.append(event)

    # -- 6. topics ---------------------------------------------------------------------------

    def _restore_topics(self, topic_ids: set[str]) -> None:
        """Re-create deleted topic rows that still have events, from the local name record."""
        missing = self._rows(
            "SELECT n.id, n.workflow_id, n.name, n.created_at FROM __engine_topic_names n"
            " WHERE n.id IN ({}) AND NOT EXISTS (SELECT 1 FROM topics t WHERE t.id = n.id)"
            " AND EXISTS (SELECT 1 FROM events e WHERE e.topic_id = n.id)", topic_ids)
        for id, wf, name, created_at in missing:
            insert_topic(self.s, id, wf, name, created_at)
            self.report.restored_topics.append(id)

    # -- helpers -----------------------------------------------------------------------------

    def _record(self, kind: str, wf: str, subjects: list[str], detail: dict[str, Any]) -> Conflict:
        conflict, created = self.db.conflicts.record(kind, wf, subjects, detail, tx=self.s)
        if created:
            self.report.conflicts.append(conflict.id)
            log.warning("conflict %s (%s) in workflow %s: %s", conflict.id, kind, wf, detail)
        return conflict

    def _stop(self, run: c.RunFacts, conflict: Conflict, reason: str) -> None:
        """End a losing run (see the module docstring); idempotent within one audit."""
        if run.id in self.stopped:
            return
        self.stopped.add(run.id)
        current = c.load_runs(self.s, [run.id]).get(run.id)
        if current is None:
            return
        past = past_mutation_boundary(current)
        if current.status == "active":
            RUNS.update(self.s, run.id, status="paused:reconciliation" if past else "crashed",
                        error=f"stopped by conflict {conflict.id} ({conflict.kind}): {reason}",
                        error_type=CONFLICT_ERROR_TYPE, end_timestamp=self.s.now_ms())
            self.report.stopped.append(run.id)
        if past:
            now = self.s.now_ms()
            rows = self.s.execute(
                "UPDATE mutations SET status = 'needs_reconcile', next_reconcile_at = ?, updated_at = ?"
                " WHERE handler_run_id = ? AND status = 'in_flight' RETURNING id", (now, now, run.id))
            self.report.reconciling.extend(r[0] for r in rows)

    def _rows(self, sql: str, ids: Iterable[str], params: tuple[str, ...] = ()) -> list[Row]:
        """Run `sql` (its `{}` becomes the placeholders of a chunk of `ids`) for every chunk."""
        ids = sorted(set(ids))
        if "{}" not in sql:
            return self.s.execute(sql, params)
        out: list[Row] = []
        for chunk in chunks(ids):
            out.extend(self.s.execute(sql.format(placeholders(chunk)), (*chunk, *params)))
        return out

    def _ids(self, sql: str, ids: Iterable[str], params: tuple[str, ...] = ()) -> list[str]:
        return [row[0] for row in self._rows(sql, ids, params)]

    def _event_workflows(self, ids: set[str]) -> dict[str, str]:
        return dict(self._rows("SELECT id, workflow_id FROM events WHERE id IN ({})", ids))

