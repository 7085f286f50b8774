"""The topic store: named event channels of one workflow.

A topic is unique per (workflow_id, name). Uniqueness cannot be a UNIQUE index on a CRR
table, so the primary key itself is derived from the natural key (DESIGN.md §7): the same
topic created on two replicas has one id and becomes one row when they merge. That is also
why `get_or_create` never needs to read before it writes.

    topic = db.topics.get_or_create("wf-1", "inbox")
    assert db.topics.get_by_name("wf-1", "inbox") == topic

Deleting a topic deletes only the topic row; its events belong to the event store
(`db.events.delete_by_topic(topic.id, tx=tx)` in the same transaction cascades).
"""

from __future__ import annotations

from functools import lru_cache

import msgspec

from .database import Database, Row, Session
from .errors import AlreadyExistsError
from .rows import Table, deterministic_id, require_text

__all__ = ["Topic", "TopicStore", "topic_id", "insert_topic"]


class Topic(msgspec.Struct, frozen=True):
    """One row of `topics` (fields are the table's columns, in order)."""

    id: str
    workflow_id: str
    name: str
    created_at: int


TOPICS = Table("topics", Topic)

_INSERT = (
    "INSERT INTO topics (id, workflow_id, name, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(id) DO NOTHING"
)
_RETURNING = f" RETURNING {', '.join(TOPICS.columns)}"


def topic_id(workflow_id: str, name: str) -> str:
    """The id of topic `name` of `workflow_id`, identical on every replica.

    Raises:
        ValueError: workflow_id or name is empty (or not a string).
    """
    return _topic_id(require_text("workflow_id", workflow_id), require_text("name", name))


@lru_cache(maxsize=4096)
def _topic_id(workflow_id: str, name: str) -> str:
    # A pure function of its arguments (no existence is cached), so it is safe across
    # rollbacks and replicas; it saves publish a hash per event.
    return deterministic_id(workflow_id, name)


def insert_topic(
    s: Session, id: str, workflow_id: str, name: str, now_ms: int, *, returning: bool = False
) -> list[Row]:
    """Insert the topic unless its row exists, inside the caller's session (no savepoint of
    its own: the event store's publish calls this for every event). With `returning`, the
    new row comes back (nothing if it already existed)."""
    return s.execute(_INSERT + (_RETURNING if returning else ""), (id, workflow_id, name, now_ms))


class TopicStore:
    """Topics of every workflow in one replica. Reached as `db.topics`."""

    table = TOPICS

    def __init__(self, db: Database):
        self.db = db

    # -- reading -------------------------------------------------------------------------

    def get(self, id: str, *, tx: Session | None = None) -> Topic | None:
        """The topic with this id, or None.

        Raises:
            ValueError: id is empty.
        """
        require_text("id", id)
        with self.db.reading(tx) as s:
            return TOPICS.get(s, id)

    def get_by_name(self, workflow_id: str, name: str, *, tx: Session | None = None) -> Topic | None:
        """The topic `name` of `workflow_id`, or None (found by its derived id: one lookup).

        Raises:
            ValueError: workflow_id or name is empty.
        """
        id = topic_id(workflow_id, name)
        with self.db.reading(tx) as s:
            return TOPICS.get(s, id)

    def list(self, workflow_id: str, limit: int | None = None, *, tx: Session | None = None) -> list[Topic]:
        """The topics of a workflow ordered by name (then id, so equal names stay stable).

        Raises:
            ValueError: workflow_id is empty, or limit is negative.
        """
        require_text("workflow_id", workflow_id)
        with self.db.reading(tx) as s:
            return TOPICS.query(s, "workflow_id = ?", (workflow_id,), order="name, id", limit=limit)

    # -- writing -------------------------------------------------------------------------

    def ensure(self, workflow_id: str, name: str, *, tx: Session | None = None) -> str:
        """Make sure the topic exists and return its id, without reading the row back.

        The hot-path form of `get_or_create` (publish calls it for every event).

        Raises:
            ValueError: workflow_id or name is empty.
        """
        id = topic_id(workflow_id, name)
        with self.db.transaction(tx) as s:
            insert_topic(s, id, workflow_id, name, self.db.clock.now_ms())
        return id

    def get_or_create(self, workflow_id: str, name: str, *, tx: Session | None = None) -> Topic:
        """The topic `name` of `workflow_id`, created if missing. Idempotent; the id is the
        same on every replica, so concurrent creation anywhere yields one row.

        Raises:
            ValueError: workflow_id or name is empty.
        """
        id = topic_id(workflow_id, name)
        with self.db.transaction(tx) as s:
            created = insert_topic(s, id, workflow_id, name, self.db.clock.now_ms(), returning=True)
            return TOPICS.row(created[0]) if created else TOPICS.require(s, id)

    def create(self, workflow_id: str, name: str, *, tx: Session | None = None) -> Topic:
        """Create the topic; refuse if it exists (one statement, so atomic under races).

        Raises:
            ValueError: workflow_id or name is empty.
            AlreadyExistsError: the topic is already there.
        """
        id = topic_id(workflow_id, name)
        with self.db.transaction(tx) as s:
            created = insert_topic(s, id, workflow_id, name, self.db.clock.now_ms(), returning=True)
            if not created:
                raise AlreadyExistsError("topics", id, f"workflow {workflow_id!r}, name {name!r}")
            return TOPICS.row(created[0])

    def delete(self, id: str, *, tx: Session | None = None) -> int:
        """Delete one topic row (not its events); return 1, or 0 if there was none.

        Raises:
            ValueError: id is empty.
        """
        require_text("id", id)
        with self.db.transaction(tx) as s:
            return TOPICS.delete(s, "id = ?", (id,))

    def delete_by_workflow(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Delete every topic of a workflow; return how many.

        Raises:
            ValueError: workflow_id is empty.
        """
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            return TOPICS.delete(s, "workflow_id = ?", (workflow_id,))
