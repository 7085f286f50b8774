"""The invariants of the stores, checked over one replica: `db.execution.check_invariants()`.

On one replica the execution model keeps them by construction; across replicas a merge can
break them and the after-merge audit (engine/replication.py) puts them back. After a full
sync every replica must report none (the multi-replica property test asserts it).

Rules (a `Violation` names the rule, the table and the row id):

    event_without_topic             an event whose topic row is gone (invisible in topic lists)
    reservation_without_run         a reserved event with no holder, or a holder that is gone
    pending_with_run                a pending event that still names a holder
    committed_event_not_consumed    a committed consumer won an event it recorded, but the event
                                    is not consumed or skipped by it
    event_disagrees_with_runs       any other event whose status/holder is not what the runs'
                                    claims say (engine/claims.py): e.g. held by a run that
                                    released it, or by the loser of a double reservation
    unrecorded_double_reservation   several runs claim one event and no conflict row says so
    two_mutations_for_run           a run with more than one mutation row
    phase_status_mismatch           phase committed without status committed, or the reverse
    terminal_status_reopened        a run is active although its status was written after its
                                    creation (only active → final writes exist)
    active_runs_of_two_replicas     one workflow has active runs started by two replicas
    unknown_status                  a run status outside the vocabulary
"""

from __future__ import annotations

import msgspec

from . import claims as c
from .database import Database, Session
from .events import PENDING, RESERVED
from .handler_runs import STATUSES
from .mutations import mutation_id

__all__ = ["Violation", "RULES", "check"]

RULES = (
    "event_without_topic",
    "reservation_without_run",
    "pending_with_run",
    "committed_event_not_consumed",
    "event_disagrees_with_runs",
    "unrecorded_double_reservation",
    "two_mutations_for_run",
    "phase_status_mismatch",
    "terminal_status_reopened",
    "active_runs_of_two_replicas",
    "unknown_status",
)


class Violation(msgspec.Struct, frozen=True, order=True):
    rule: str
    table: str
    id: str
    detail: str


def check(db: Database, *, tx: Session | None = None) -> list[Violation]:
    """Every violation on this replica, sorted (rule, table, id)."""
    with db.reading(tx) as s:
        found = [
            *_events_without_topic(s),
            *_reservations(s),
            *_mutations(s),
            *_runs(s),
            *_active_runs_of_two_replicas(s),
        ]
    return sorted(found)


def _events_without_topic(s: Session) -> list[Violation]:
    rows = s.execute("SELECT e.id, e.topic_id FROM events e LEFT JOIN topics t ON t.id = e.topic_id WHERE t.id IS NULL")
    return [Violation("event_without_topic", "events", id, f"topic {topic} is gone") for id, topic in rows]


def _reservations(s: Session) -> list[Violation]:
    """The event rules: every event someone claims, or that names a holder."""
    listing = c.listed_events(s)
    events = {
        id: (status, holder)
        for id, status, holder in s.execute("SELECT id, status, reserved_by_run_id FROM events ORDER BY id")
        if id in listing or holder or status == RESERVED
    }
    runs = c.load_runs(s, {r for ids in listing.values() for r in ids} | {h for _s, h in events.values() if h})
    claims = c.claimants(events, listing, runs, c.retried(s, runs))
    contested = [claim.run for found in claims.values() if len(found) > 1 for claim in found]
    roots = c.lineage_roots(s, contested)
    made_by = c.creators(s, [run.id for run in contested])
    owners = _owners(s)
    recorded = _recorded_double_reservations(s)
    out: list[Violation] = []
    for id, (status, holder) in events.items():
        found = claims[id]
        winner = min(found, key=lambda k: c.rank(k, owners.get(k.run.workflow_id), roots, made_by)) if found else None
        out.extend(_event_violations(id, status, holder, runs, winner))
        if winner is None:  # nobody claims it: no losers either
            continue
        for loser in (k for k in found if k is not winner):
            if (id, loser.run.id) not in recorded:
                out.append(Violation("unrecorded_double_reservation", "events", id,
                                     f"run {loser.run.id} lost it to run {winner.run.id}, no conflict recorded"))
    return out


def _event_violations(id: str, status: str, holder: str, runs: dict[str, c.RunFacts], winner: c.Claim | None) -> list[Violation]:
    if status == RESERVED and (not holder or holder not in runs):
        return [Violation("reservation_without_run", "events", id, f"reserved by missing run {holder!r}")]
    if status == PENDING and holder:
        return [Violation("pending_with_run", "events", id, f"pending but names run {holder}")]
    expected = c.expected_event(status, holder, winner)
    if expected == (status, holder):
        return []
    if winner is not None and winner.kind == c.FINAL:
        return [Violation("committed_event_not_consumed", "events", id,
                          f"committed run {winner.run.id} won it, but it is {status} by {holder or 'nobody'}")]
    return [Violation("event_disagrees_with_runs", "events", id,
                      f"is {status} by {holder or 'nobody'}; the runs' claims say {expected[0]} by {expected[1] or 'nobody'}")]


def _owners(s: Session) -> dict[str, str]:
    return {wf: owner for wf, owner in s.execute(
        "SELECT workflow_id, json_extract(claim, '$.owner') FROM ownership WHERE json_valid(claim)")}


def _recorded_double_reservations(s: Session) -> set[tuple[str, str]]:
    """(event id, run id) pairs named together by a double_reservation conflict (subjects
    are [event, runs...], sorted; any pair of subjects is kept)."""
    pairs: set[tuple[str, str]] = set()
    rows = s.execute("SELECT subjects FROM conflicts WHERE kind = 'double_reservation' AND json_valid(subjects)")
    for (subjects,) in rows:
        ids = msgspec.json.decode(subjects)
        pairs.update((a, b) for a in ids for b in ids if a != b)
    return pairs


def _mutations(s: Session) -> list[Violation]:
    out = [Violation("two_mutations_for_run", "handler_runs", run, f"{n} mutations")
           for run, n in s.execute("SELECT handler_run_id, count(*) FROM mutations GROUP BY handler_run_id HAVING count(*) > 1")]
    for id, run in s.execute("SELECT id, handler_run_id FROM mutations"):
        if run and id != mutation_id(run):
            out.append(Violation("two_mutations_for_run", "mutations", id, f"id is not the derived id of run {run}"))
    return out


def _runs(s: Session) -> list[Violation]:
    out: list[Violation] = []
    for id, phase, status in s.execute("SELECT id, phase, status FROM handler_runs"):
        if status not in STATUSES.states:
            out.append(Violation("unknown_status", "handler_runs", id, f"status {status!r}"))
        if (phase == "committed") != (status == "committed"):
            out.append(Violation("phase_status_mismatch", "handler_runs", id, f"phase {phase}, status {status}"))
    reopened = s.execute(
        "SELECT r.id, c.col_version FROM handler_runs r JOIN handler_runs__crsql_pks p ON p.id = r.id"
        " JOIN handler_runs__crsql_clock c ON c.key = p.__crsql_key AND c.col_name = 'status'"
        " WHERE r.status = 'active' AND c.col_version > 1"
    )
    out.extend(Violation("terminal_status_reopened", "handler_runs", id, f"active at status version {v}")
               for id, v in reopened)
    return out


def _active_runs_of_two_replicas(s: Session) -> list[Violation]:
    active: dict[str, list[str]] = {}
    for id, wf in s.execute("SELECT id, workflow_id FROM handler_runs WHERE status = 'active'"):
        active.setdefault(wf, []).append(id)
    made_by = c.active_creators(s)
    out = []
    for wf, ids in sorted(active.items()):
        sites = {made_by.get(id) for id in ids}
        if len(sites) > 1:
            out.append(Violation("active_runs_of_two_replicas", "handler_runs", sorted(ids)[0],
                                 f"workflow {wf}: active runs {sorted(ids)} from {len(sites)} replicas"))
    return out
