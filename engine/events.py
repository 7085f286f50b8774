"""The event store: messages published on topics and the reservations runs hold on them.

An event's life: published `pending` → `reserved` by one run (`reserve`) → `consumed` or
`skipped` by that run; `release` puts it back to `pending` for another attempt.

    pending ──reserve──▶ reserved ──consume──▶ consumed
       ▲                    │      ──skip────▶ skipped
       └─────release────────┘      (transfer_reservations moves it to another run)

The event id is derived from (topic id, message id) (DESIGN.md §7), so publishing the same
message on two replicas yields one row after merge, and re-publishing is an upsert that
refreshes the payload but never touches the status.

`consume`, `skip`, `release` and `transfer_reservations` act only on events that are
*currently reserved by that run*. Events the run does not hold (pending, reserved by another
run, already consumed or skipped) are left alone, and the returned count says how many were
acted on: 0 means the run held nothing, which the caller (the execution model) treats as it
sees fit. There is no error for that case on purpose: a retried commit must be harmless.

`attempt_number` counts reserve/release cycles. It is a read-modify-write counter: two
replicas that release the same event concurrently converge to one increment (last writer
wins per column), so treat it as a local hint, not an exact count across replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from .database import Database, Session
from .rows import Table, chunks, deterministic_id, encode_json, placeholders, require_text
from .topics import insert_topic, topic_id

__all__ = [
    "Event",
    "EventStore",
    "event_id",
    "PENDING",
    "RESERVED",
    "CONSUMED",
    "SKIPPED",
    "STATUSES",
]

PENDING, RESERVED, CONSUMED, SKIPPED = "pending", "reserved", "consumed", "skipped"
STATUSES = (PENDING, RESERVED, CONSUMED, SKIPPED)



class Event(msgspec.Struct, frozen=True):
    """One row of `events` (fields are the table's columns, in order); payload and
    caused_by are decoded JSON."""

    id: str
    topic_id: str
    workflow_id: str
    message_id: str
    title: str
    payload: Any
    status: str
    reserved_by_run_id: str
    created_by_run_id: str
    attempt_number: int
    caused_by: list[str]
    created_at: int
    updated_at: int


EVENTS = Table("events", Event, json_columns={"payload": None, "caused_by": None})

_RETURNING = f" RETURNING {', '.join(EVENTS.columns)}"
_PUBLISH = (
    "INSERT INTO events (id, topic_id, workflow_id, message_id, title, payload, created_by_run_id,"
    " caused_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(id) DO UPDATE SET title = excluded.title, payload = excluded.payload,"
    " caused_by = excluded.caused_by, updated_at = excluded.updated_at" + _RETURNING
)
_OLDEST_FIRST = "created_at, id"


def event_id(topic_id: str, message_id: str) -> str:
    """The id of message `message_id` on topic `topic_id`, identical on every replica.

    Raises:
        ValueError: topic_id or message_id is empty.
    """
    return deterministic_id(require_text("topic_id", topic_id), require_text("message_id", message_id))


def _unique(values: Iterable[str], name: str) -> list[str]:
    """Validated values without duplicates, first occurrence order kept."""
    if isinstance(values, str):
        raise ValueError(f"{name} must be a collection of strings, not one string")
    return list(dict.fromkeys(require_text(name, v) for v in values))


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown event status {status!r}; expected one of {', '.join(STATUSES)}")


class EventStore:
    """Events of every workflow in one replica. Reached as `db.events`."""

    table = EVENTS

    def __init__(self, db: Database):
        self.db = db

    # -- reading -------------------------------------------------------------------------

    def get(self, id: str, *, tx: Session | None = None) -> Event | None:
        """The event with this id, or None.

        Raises:
            ValueError: id is empty.
            CorruptDataError: its payload or caused_by is malformed JSON.
        """
        require_text("id", id)
        with self.db.reading(tx) as s:
            return EVENTS.get(s, id)

    def get_by_message_id(self, topic_id: str, message_id: str, *, tx: Session | None = None) -> Event | None:
        """The event of `message_id` on a topic, or None (one lookup by derived id).

        Raises:
            ValueError: topic_id or message_id is empty.
            CorruptDataError: a JSON column is malformed.
        """
        id = event_id(topic_id, message_id)
        with self.db.reading(tx) as s:
            return EVENTS.get(s, id)

    def get_by_message_ids(
        self, workflow_id: str, topic_name: str, message_ids: Iterable[str], *, tx: Session | None = None
    ) -> list[Event]:
        """The events of these messages on one topic, in the order the ids were given;
        unknown ids are left out and duplicates appear once.

        Raises:
            ValueError: an empty workflow id, topic name or message id.
            CorruptDataError: a JSON column is malformed.
        """
        tid = topic_id(workflow_id, topic_name)
        ids = [event_id(tid, m) for m in _unique(message_ids, "message_id")]
        found: dict[str, Event] = {}
        with self.db.reading(tx) as s:
            for chunk in chunks(ids):
                for event in EVENTS.query(s, f"id IN ({placeholders(chunk)})", chunk):
                    found[event.id] = event
        return [found[i] for i in ids if i in found]

    def peek(
        self,
        workflow_id: str,
        topic_name: str,
        *,
        limit: int | None = 100,
        status: str | None = PENDING,
        tx: Session | None = None,
    ) -> list[Event]:
        """Events of a topic with `status` (None: any), oldest first; equal timestamps are
        ordered by id, so every replica lists the same events in the same order.

        Raises:
            ValueError: empty workflow id or topic name, unknown status, negative limit.
            CorruptDataError: a JSON column is malformed.
        """
        _check_status(status)
        where, params = "topic_id = ?", [topic_id(workflow_id, topic_name)]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        with self.db.reading(tx) as s:
            return EVENTS.query(s, where, params, order=_OLDEST_FIRST, limit=limit)

    def reserved_by(self, run_id: str, *, tx: Session | None = None) -> list[Event]:
        """The events `run_id` currently holds reserved, oldest first.

        Raises:
            ValueError: run_id is empty.
        """
        require_text("run_id", run_id)
        with self.db.reading(tx) as s:
            return EVENTS.query(s, "reserved_by_run_id = ? AND status = ?", (run_id, RESERVED),
                                order=_OLDEST_FIRST)

    def count_pending(self, workflow_id: str, topic_name: str, *, tx: Session | None = None) -> int:
        """How many events of the topic are pending (0 for an unknown topic).

        Raises:
            ValueError: workflow_id or topic_name is empty.
        """
        return self.count_pending_by_topic(workflow_id, [topic_name], tx=tx)[topic_name]

    def count_pending_by_topic(
        self, workflow_id: str, names: Iterable[str], *, tx: Session | None = None
    ) -> dict[str, int]:
        """Pending events per topic name; every requested name is a key (0 if unknown).

        Raises:
            ValueError: an empty workflow id or topic name.
        """
        by_id = {topic_id(workflow_id, name): name for name in _unique(names, "topic_name")}
        counts = dict.fromkeys(by_id.values(), 0)
        ids = list(by_id)
        with self.db.reading(tx) as s:
            for chunk in chunks(ids):
                rows = s.execute(
                    f"SELECT topic_id, count(*) FROM events WHERE topic_id IN ({placeholders(chunk)})"
                    " AND status = ? GROUP BY topic_id", (*chunk, PENDING))
                for tid, count in rows:
                    counts[by_id[tid]] = count
        return counts

    def has_pending(self, workflow_id: str, names: Iterable[str], *, tx: Session | None = None) -> bool:
        """Whether any of these topics has a pending event (False for no names).

        Raises:
            ValueError: an empty workflow id or topic name.
        """
        require_text("workflow_id", workflow_id)
        ids = [topic_id(workflow_id, name) for name in _unique(names, "topic_name")]
        with self.db.reading(tx) as s:
            for chunk in chunks(ids):
                if s.scalar(f"SELECT EXISTS (SELECT 1 FROM events WHERE topic_id IN ({placeholders(chunk)})"
                            " AND status = ?)", (*chunk, PENDING)):
                    return True
        return False

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        workflow_id: str,
        topic_name: str,
        message_id: str,
        payload: Any,
        *,
        created_by_run_id: str = "",
        caused_by: Iterable[str] = (),
        title: str = "",
        tx: Session | None = None,
    ) -> Event:
        """Publish a message on a topic (created if needed) and return the event row.

        Re-publishing a message id is an upsert: payload, caused_by and title are replaced,
        `updated_at` moves; status, reservation, attempts, creator and `created_at` stay.
        Two statements, no read: the topic insert is a no-op when it exists and the event
        upsert returns the row.

        Raises:
            ValueError: empty workflow id, topic name or message id, or a caused_by id.
            TypeError: payload is not JSON-serializable.
        """
        tid = topic_id(workflow_id, topic_name)
        id = event_id(tid, message_id)
        causes = encode_json(_unique(caused_by, "caused_by")) if caused_by else "[]"
        body = encode_json(payload)
        with self.db.transaction(tx) as s:
            now = self.db.clock.now_ms()
            insert_topic(s, tid, workflow_id, topic_name, now)
            row = s.execute(_PUBLISH, (id, tid, workflow_id, message_id, title, body,
                                       created_by_run_id, causes, now, now))
        return EVENTS.row(row[0])

    # -- reservations ----------------------------------------------------------------------

    def reserve(
        self,
        run_id: str,
        workflow_id: str,
        messages: Mapping[str, Iterable[str]],
        *,
        tx: Session | None = None,
    ) -> list[str]:
        """Reserve the named messages for `run_id`; return the ids of the events reserved,
        in the order asked for.

        Only events that exist, belong to `workflow_id` and are pending are reserved: one
        conditional UPDATE per chunk, so two racing reservers never both win an event.

        Raises:
            ValueError: empty run id, workflow id, topic name or message id.
        """
        require_text("run_id", run_id)
        require_text("workflow_id", workflow_id)
        wanted: list[str] = []
        for name, message_ids in messages.items():
            tid = topic_id(workflow_id, name)
            wanted.extend(event_id(tid, m) for m in _unique(message_ids, "message_id"))
        wanted = list(dict.fromkeys(wanted))
        won: set[str] = set()
        with self.db.transaction(tx) as s:
            now = self.db.clock.now_ms()
            for chunk in chunks(wanted):
                rows = s.execute(
                    f"UPDATE events SET status = ?, reserved_by_run_id = ?, updated_at = ?"
                    f" WHERE id IN ({placeholders(chunk)}) AND workflow_id = ? AND status = ? RETURNING id",
                    (RESERVED, run_id, now, *chunk, workflow_id, PENDING))
                won.update(r[0] for r in rows)
        return [i for i in wanted if i in won]

    def _settle(self, run_id: str, assignments: str, params: tuple[str, ...], tx: Session | None) -> int:
        """Apply `assignments` to the events `run_id` holds reserved; return how many."""
        require_text("run_id", run_id)
        with self.db.transaction(tx) as s:
            s.execute(f"UPDATE events SET {assignments}, updated_at = ?"
                      " WHERE reserved_by_run_id = ? AND status = ?",
                      (*params, self.db.clock.now_ms(), run_id, RESERVED))
            return s.changes()

    def consume(self, run_id: str, *, tx: Session | None = None) -> int:
        """Mark every event `run_id` holds reserved as consumed (the run id stays recorded);
        return how many. 0 means the run held no reservations (see the module docstring).

        Raises:
            ValueError: run_id is empty.
        """
        return self._settle(run_id, "status = ?", (CONSUMED,), tx)

    def skip(self, run_id: str, *, tx: Session | None = None) -> int:
        """Mark every event `run_id` holds reserved as skipped; return how many (0: none held).

        Raises:
            ValueError: run_id is empty.
        """
        return self._settle(run_id, "status = ?", (SKIPPED,), tx)

    def release(self, run_id: str, *, tx: Session | None = None) -> int:
        """Put every event `run_id` holds back to pending, owner cleared, attempt_number + 1;
        return how many (0: none held).

        Raises:
            ValueError: run_id is empty.
        """
        return self._settle(
            run_id, "status = ?, reserved_by_run_id = '', attempt_number = attempt_number + 1",
            (PENDING,), tx)

    def transfer_reservations(self, from_run_id: str, to_run_id: str, *, tx: Session | None = None) -> int:
        """Hand every event `from_run_id` holds reserved to `to_run_id` (a retry run takes
        over its predecessor's events); return how many.

        Raises:
            ValueError: a run id is empty, or both are the same run.
        """
        require_text("to_run_id", to_run_id)
        if from_run_id == to_run_id:
            raise ValueError(f"cannot transfer reservations of run {from_run_id!r} to itself")
        return self._settle(from_run_id, "reserved_by_run_id = ?", (to_run_id,), tx)

    # -- deleting --------------------------------------------------------------------------

    def delete_by_topic(self, topic_id: str, *, tx: Session | None = None) -> int:
        """Delete every event of a topic; return how many.

        Raises:
            ValueError: topic_id is empty.
        """
        require_text("topic_id", topic_id)
        with self.db.transaction(tx) as s:
            return EVENTS.delete(s, "topic_id = ?", (topic_id,))

    def delete_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Delete every event of a workflow; return how many.

        Raises:
            ValueError: workflow_id is empty.
        """
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            return EVENTS.delete(s, "workflow_id = ?", (workflow_id,))
