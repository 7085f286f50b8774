"""TopicStore: creation (idempotent and strict), lookups, ordering, deletes read back,
validation, verbatim odd names, and ids that agree across replicas."""

from __future__ import annotations

import pytest

from engine import AlreadyExistsError
from engine.rows import deterministic_id
from engine.topics import Topic, topic_id

ODD_NAMES = [
    "it's",
    'say "hi"',
    "100%",
    "_%_",
    "'; DROP TABLE topics; --",
    "Ünïcödé ✓ 話題",
    "a\nb\tc",
    "back\\slash",
]


def test_get_or_create_returns_the_row_once_and_then_the_same_row(db, clock):
    first = db.topics.get_or_create("wf", "inbox")
    assert first == Topic(id=deterministic_id("wf", "inbox"), workflow_id="wf", name="inbox",
                          created_at=1_700_000_000_000)
    clock.advance(5_000)
    again = db.topics.get_or_create("wf", "inbox")
    assert again == first  # created_at is not moved by the second call
    assert db.connection.execute("SELECT count(*) FROM topics").fetchall() == [(1,)]


def test_create_refuses_an_existing_topic_and_names_it(db):
    created = db.topics.create("wf", "inbox")
    with pytest.raises(AlreadyExistsError) as caught:
        db.topics.create("wf", "inbox")
    assert caught.value.table == "topics"
    assert caught.value.id == created.id
    assert "'inbox'" in str(caught.value) and "'wf'" in str(caught.value)
    assert db.topics.list("wf") == [created]


def test_get_and_get_by_name(db):
    topic = db.topics.create("wf", "inbox")
    assert db.topics.get(topic.id) == topic
    assert db.topics.get_by_name("wf", "inbox") == topic
    assert db.topics.get("0" * 32) is None
    assert db.topics.get_by_name("wf", "outbox") is None
    assert db.topics.get_by_name("other-wf", "inbox") is None


def test_same_name_in_two_workflows_is_two_topics(db):
    a = db.topics.create("wf-a", "inbox")
    b = db.topics.create("wf-b", "inbox")
    assert a.id != b.id
    assert db.topics.list("wf-a") == [a]
    assert db.topics.list("wf-b") == [b]


def test_list_is_ordered_by_name_not_by_creation_and_honours_limit(db, clock):
    for name in ["delta", "alpha", "charlie", "bravo"]:
        db.topics.create("wf", name)
        clock.advance(1)
    db.topics.create("other", "aardvark")
    assert [t.name for t in db.topics.list("wf")] == ["alpha", "bravo", "charlie", "delta"]
    assert [t.name for t in db.topics.list("wf", limit=2)] == ["alpha", "bravo"]
    assert db.topics.list("wf", limit=0) == []
    assert db.topics.list("nobody") == []
    with pytest.raises(ValueError, match="limit"):
        db.topics.list("wf", limit=-1)


def test_created_at_comes_from_the_clock(db, clock):
    first = db.topics.create("wf", "a")
    clock.advance(250)
    second = db.topics.create("wf", "b")
    assert (first.created_at, second.created_at) == (1_700_000_000_000, 1_700_000_000_250)


def test_delete_returns_count_and_the_row_is_gone(db):
    keep = db.topics.create("wf", "keep")
    gone = db.topics.create("wf", "gone")
    assert db.topics.delete(gone.id) == 1
    assert db.topics.get(gone.id) is None
    assert db.topics.get_by_name("wf", "gone") is None
    assert db.topics.delete(gone.id) == 0
    assert db.topics.list("wf") == [keep]


def test_delete_by_workflow_deletes_only_that_workflow(db):
    for name in ["a", "b", "c"]:
        db.topics.create("wf", name)
    other = db.topics.create("other", "a")
    assert db.topics.delete_by_workflow("wf") == 3
    assert db.topics.list("wf") == []
    assert db.topics.get(other.id) == other
    assert db.topics.delete_by_workflow("wf") == 0


def test_a_deleted_topic_can_be_created_again(db, clock):
    topic = db.topics.create("wf", "inbox")
    assert db.topics.delete(topic.id) == 1
    clock.advance(10)
    again = db.topics.create("wf", "inbox")
    assert again.id == topic.id
    assert again.created_at == topic.created_at + 10


def test_ensure_creates_without_reading_and_is_idempotent(db):
    id = db.topics.ensure("wf", "inbox")
    assert id == topic_id("wf", "inbox")
    assert db.topics.ensure("wf", "inbox") == id
    assert db.topics.get(id).name == "inbox"
    assert db.connection.execute("SELECT count(*) FROM topics").fetchall() == [(1,)]


@pytest.mark.parametrize("call", [
    lambda db: db.topics.get_or_create("", "x"),
    lambda db: db.topics.get_or_create("wf", ""),
    lambda db: db.topics.create("", "x"),
    lambda db: db.topics.create("wf", ""),
    lambda db: db.topics.get(""),
    lambda db: db.topics.get_by_name("", "x"),
    lambda db: db.topics.get_by_name("wf", ""),
    lambda db: db.topics.list(""),
    lambda db: db.topics.delete(""),
    lambda db: db.topics.delete_by_workflow(""),
    lambda db: db.topics.ensure("wf", ""),
])
def test_empty_identifiers_are_refused(db, call):
    with pytest.raises(ValueError, match="must not be empty"):
        call(db)
    assert db.connection.execute("SELECT count(*) FROM topics").fetchall() == [(0,)]


def test_non_string_names_are_refused(db):
    with pytest.raises(ValueError, match="must be a string"):
        db.topics.create("wf", 7)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_injection_looking_names_are_stored_and_found_verbatim(db, name):
    topic = db.topics.create(name, name)
    assert (topic.workflow_id, topic.name) == (name, name)
    assert db.topics.get_by_name(name, name) == topic
    assert db.topics.list(name) == [topic]
    # '%' and '_' are not wildcards anywhere: a look-alike finds nothing.
    assert db.topics.get_by_name(name, name + "%") is None
    raw = db.connection.execute("SELECT workflow_id, name FROM topics WHERE id = ?", (topic.id,)).fetchall()
    assert raw == [(name, name)]
    assert db.connection.execute("SELECT count(*) FROM sqlite_master WHERE name = 'topics'").fetchall() == [(1,)]


def test_same_topic_has_the_same_id_on_two_replicas(open_db):
    a, b = open_db("a"), open_db("b")
    assert a.site_id != b.site_id
    on_a = a.topics.get_or_create("wf", "inbox")
    on_b = b.topics.create("wf", "inbox")
    assert on_a.id == on_b.id == topic_id("wf", "inbox")


def test_topic_created_on_two_replicas_merges_into_one_row(open_db, clock):
    a, b = open_db("a"), open_db("b")
    a.topics.create("wf", "inbox")
    clock.advance(3)
    b.topics.create("wf", "inbox")
    b.topics.create("wf", "only-b")
    changes = a.connection.execute(
        'SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes').fetchall()
    with b.transaction() as tx:
        tx.executemany('INSERT INTO crsql_changes ("table", pk, cid, val, col_version, db_version, site_id, cl, seq)'
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", changes)
    assert [t.name for t in b.topics.list("wf")] == ["inbox", "only-b"]
    assert b.connection.execute("SELECT count(*) FROM topics WHERE name = 'inbox'").fetchall() == [(1,)]
