"""Which run may hold which event: the reservation claims that the invariant checker and the
after-merge audit (engine/replication.py) both reason about.

On one replica the execution model keeps an event's `status` / `reserved_by_run_id` in step
with the runs. Across replicas two runs may have reserved the same event while partitioned,
and cr-sqlite merges the event's columns one by one (last writer wins per column), so the
merged row may name either run, or mix the two reservations. The runs themselves are the
evidence: `prepare_consumer` records the events a run reserved in its `prepare_result`
(`reserved_event_ids`), and a run's phase and status say whether it still holds them.

**A run's claim on an event it recorded** (consumer runs only):

    has a retry run (retry_of points at it)        none  (handed over to the retry)
    mutation_outcome 'failure'                     none  (fail_mutation released its events)
    status committed                               FINAL (the event is consumed or skipped)
    status active                                  HOLD  (reserved by it)
    ended past the mutation boundary               HOLD  (kept reserved for a retry run)
    ended before the mutation boundary             none  (released)

A run that holds an event without having recorded it (a reservation made with the event store
directly) claims it too, by the same table. When several runs claim one event the **winner** is
the first by `rank`: a committed claim first (the event stays consumed: un-consuming it would
invite a second side effect), then a claim past the mutation boundary (its side effect may have
happened), then a run started by the workflow's owning replica, then the oldest retry family
(its first run's start_timestamp, then id). `expected_event` is the status and holder the
event must end with; every replica computes the same from the same converged rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .database import Session
from .rows import chunks, placeholders
from .events import CONSUMED, PENDING, RESERVED, SKIPPED
from .execution import past_mutation_boundary

__all__ = [
    "HOLD",
    "FINAL",
    "RunFacts",
    "Claim",
    "claim_kind",
    "load_runs",
    "load_workflow_runs",
    "listed_events",
    "retried",
    "claimants",
    "lineage_roots",
    "column_writers",
    "creators",
    "active_creators",
    "rank",
    "expected_event",
]

HOLD, FINAL = "hold", "final"
_RUN_COLUMNS = "id, workflow_id, handler_type, phase, status, retry_of, mutation_outcome, start_timestamp, error_type"
# Clock tables the site lookups may read (a fixed set: the name is pasted into SQL).
_CLOCKED = frozenset({"handler_runs", "events", "mutations", "topics", "handler_state", "ownership", "conflicts"})


class RunFacts(msgspec.Struct, frozen=True):
    """The columns of a run that decide its claims (no JSON decoding: a corrupt log must not
    stop an audit)."""

    id: str
    workflow_id: str
    handler_type: str
    phase: str
    status: str
    retry_of: str
    mutation_outcome: str
    start_timestamp: int
    error_type: str


class Claim(msgspec.Struct, frozen=True):
    run: RunFacts
    kind: str  # HOLD or FINAL


def claim_kind(run: RunFacts, has_retry: bool) -> str | None:
    """HOLD, FINAL or None: what the run claims on the events it recorded (module docstring)."""
    if run.handler_type != "consumer" or has_retry or run.mutation_outcome == "failure":
        return None
    if run.status == "committed":
        return FINAL
    if run.status == "active" or past_mutation_boundary(run):
        return HOLD
    return None


def load_runs(s: Session, ids: Iterable[str]) -> dict[str, RunFacts]:
    """The runs with these ids that exist here."""
    found: dict[str, RunFacts] = {}
    for chunk in chunks(sorted(set(ids))):
        for row in s.execute(f"SELECT {_RUN_COLUMNS} FROM handler_runs WHERE id IN ({placeholders(chunk)})", chunk):
            found[row[0]] = RunFacts(*row)
    return found


def load_workflow_runs(s: Session, workflow_id: str, where: str = "", params: tuple[str, ...] = ()) -> list[RunFacts]:
    sql = f"SELECT {_RUN_COLUMNS} FROM handler_runs WHERE workflow_id = ?" + (f" AND {where}" if where else "")
    return [RunFacts(*row) for row in s.execute(sql + " ORDER BY start_timestamp, id", (workflow_id, *params))]


def listed_events(s: Session, workflow_id: str | None = None) -> dict[str, list[str]]:
    """event id → ids of the consumer runs whose prepare_result records it (of one workflow, or
    all). A prepare_result that is not valid JSON, or has no list of ids, records nothing.

    Why a scan: prepare_result is JSON and SQLite has no index into it; the cost is one pass
    over the workflow's consumer runs, paid once per audited workflow per merged page.
    """
    sql = (
        "SELECT j.value, r.id FROM handler_runs r,"
        " json_each(CASE WHEN json_valid(r.prepare_result) THEN r.prepare_result ELSE '{}' END,"
        " '$.reserved_event_ids') j"
        " WHERE r.handler_type = 'consumer' AND r.prepare_result <> '' AND j.type = 'text'"
    )
    params: tuple[str, ...] = ()
    if workflow_id is not None:
        sql += " AND r.workflow_id = ?"
        params = (workflow_id,)
    listing: dict[str, list[str]] = {}
    for event, run in s.execute(sql + " ORDER BY r.id", params):
        runs = listing.setdefault(event, [])
        if run not in runs:
            runs.append(run)
    return listing


def retried(s: Session, ids: Iterable[str]) -> set[str]:
    """Which of these runs have a retry run here."""
    found: set[str] = set()
    for chunk in chunks(sorted(set(ids))):
        found.update(r[0] for r in s.execute(
            f"SELECT DISTINCT retry_of FROM handler_runs WHERE retry_of IN ({placeholders(chunk)})", chunk))
    return found


def claimants(
    events: dict[str, tuple[str, str]], listing: dict[str, list[str]], runs: dict[str, RunFacts], has_retry: set[str]
) -> dict[str, list[Claim]]:
    """event id → the claims on it. `events` maps event id → (status, reserved_by_run_id);
    `runs` must hold every run named by `listing` for these events and every holder."""
    result: dict[str, list[Claim]] = {}
    for event_id, (_status, holder) in events.items():
        claims: list[Claim] = []
        named = list(listing.get(event_id, ()))
        if holder and holder not in named:
            named.append(holder)
        for run_id in named:
            run = runs.get(run_id)
            if run is None:
                continue
            kind = claim_kind(run, run_id in has_retry)
            if kind is not None:
                claims.append(Claim(run, kind))
        result[event_id] = claims
    return result


def lineage_roots(s: Session, runs: Iterable[RunFacts]) -> dict[str, RunFacts]:
    """run id → the oldest run of its retry family that exists here (itself if none)."""
    roots: dict[str, RunFacts] = {}
    for run in runs:
        root, seen = run, {run.id}
        while root.retry_of and root.retry_of not in seen:
            parent = load_runs(s, [root.retry_of]).get(root.retry_of)
            if parent is None:
                break
            seen.add(parent.id)
            root = parent
        roots[run.id] = root
    return roots


def column_writers(s: Session, table: str, ids: Iterable[str], columns: Iterable[str]) -> dict[tuple[str, str], str]:
    """(row id, column) → site id of the replica whose write of that column is the current one.

    cr-sqlite keeps this in `crsql_changes.site_id` (a merged change keeps its origin site).
    That virtual table does not push a pk filter down (every lookup would scan every clock
    row), so this reads the same facts from the tables behind it in cr-sqlite 0.16.3:
    `<table>__crsql_pks` (key → primary key), `<table>__crsql_clock` (key, col_name, site
    ordinal) and `crsql_site_id` (ordinal → site id; 0 is this replica). A test checks the two
    agree. Only for tables whose primary key is a single `id` column.

    Raises:
        ValueError: `table` is not one of the engine's CRR tables.
    """
    if table not in _CLOCKED:
        raise ValueError(f"no clock lookup for table {table!r}")
    cols = sorted(set(columns))
    found: dict[tuple[str, str], str] = {}
    for chunk in chunks(sorted(set(ids))):
        rows = s.execute(
            f'SELECT p.id, c.col_name, lower(hex(site.site_id)) FROM "{table}__crsql_pks" p'
            f' JOIN "{table}__crsql_clock" c ON c.key = p.__crsql_key'
            " JOIN crsql_site_id site ON site.ordinal = c.site_id"
            f" WHERE p.id IN ({placeholders(chunk)}) AND c.col_name IN ({placeholders(cols)})",
            (*chunk, *cols),
        )
        for row_id, column, site in rows:
            found[(row_id, column)] = site
    return found


def creators(s: Session, ids: Iterable[str]) -> dict[str, str]:
    """run id → site id of the replica that created it: the writer of `script_run_id`, a
    column nothing changes after `create`."""
    return {run: site for (run, _column), site in column_writers(s, "handler_runs", ids, ["script_run_id"]).items()}


def active_creators(s: Session, workflow_id: str | None = None) -> dict[str, str]:
    """run id → creating site of every active run (of one workflow, or all), in one query over
    the same clock tables as `column_writers`."""
    sql = (
        "SELECT r.id, lower(hex(site.site_id)) FROM handler_runs r"
        " JOIN handler_runs__crsql_pks p ON p.id = r.id"
        " JOIN handler_runs__crsql_clock c ON c.key = p.__crsql_key AND c.col_name = 'script_run_id'"
        " JOIN crsql_site_id site ON site.ordinal = c.site_id WHERE r.status = 'active'"
    )
    if workflow_id is None:
        return dict(s.execute(sql))
    return dict(s.execute(sql + " AND r.workflow_id = ?", (workflow_id,)))


def rank(
    claim: Claim, owner: str | None, roots: dict[str, RunFacts], made_by: dict[str, str]
) -> tuple[int, int, int, str, int, str]:
    """Sort key of a claim: the smallest wins (see the module docstring)."""
    run = claim.run
    progress = 0 if claim.kind == FINAL else 1 if past_mutation_boundary(run) else 2
    root = roots.get(run.id, run)
    by_owner = 0 if owner is not None and made_by.get(run.id) == owner else 1
    return (progress, by_owner, root.start_timestamp, root.id, run.start_timestamp, run.id)


def expected_event(status: str, holder: str, winner: Claim | None) -> tuple[str, str]:
    """The (status, reserved_by_run_id) an event must have, given the winning claim.

    Nobody claims it: a reservation is released (pending, no holder); consumed or skipped
    stays as it is (its run may have been deleted: history, not a reservation).
    """
    if winner is None:
        if status == RESERVED or (status == PENDING and holder):
            return PENDING, ""
        return status, holder
    if winner.kind == HOLD:
        return RESERVED, winner.run.id
    return (status if status in (CONSUMED, SKIPPED) else CONSUMED), winner.run.id
