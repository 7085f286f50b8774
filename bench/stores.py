"""B1 and B2: what our store layer and the extension each add to a plain INSERT.

B1  `db.events.publish` × n in one transaction  vs  the same rows as per-row raw INSERTs
    into the same CRR tables (the topic row once, then one INSERT per event). Ratio = our
    Python layer (ids, JSON, validation, upsert + RETURNING, row decoding) over SQL alone.
B2  raw INSERT of n rows into the CRR `events` table  vs  the same into the same schema
    without `crsql_as_crr` (the migration files executed on a plain APSW connection).
    Ratio = the cost of cr-sqlite's triggers and clock tables: report only.
"""

from __future__ import annotations

import msgspec

from engine.events import event_id
from engine.topics import topic_id

from .data import (CHANGES_PER_EVENT, INSERT_EVENT, NOW_MS, TOPIC, WORKFLOW, Workspace, event_rows,
                   payload, plain_schema)
from .harness import Row, Sample, db_digest, measure_pair, ratio_row, stopwatch

__all__ = ["b1_publish", "b2_crr_cost"]

_json = msgspec.json.Encoder()
_INSERT_TOPIC = "INSERT INTO topics (id, workflow_id, name, created_at) VALUES (?, ?, ?, ?)"


def _publish_inputs(count: int) -> list[tuple[str, dict]]:
    return [(f"m{i:09d}", payload(i)) for i in range(count)]


def _publish_rows(inputs: list[tuple[str, dict]]) -> tuple[tuple, list[tuple]]:
    """The topic row and the event rows `publish` would write for `inputs`, precomputed so
    the baseline times SQL only."""
    tid = topic_id(WORKFLOW, TOPIC)
    rows = [(event_id(tid, m), tid, WORKFLOW, m, "", _json.encode(p).decode(), "pending", "", "", 1, "[]",
             NOW_MS, NOW_MS) for m, p in inputs]
    return (tid, WORKFLOW, TOPIC, NOW_MS), rows


def b1_publish(ws: Workspace, count: int, reps: int) -> list[Row]:
    """B1: publish `count` events in one transaction vs per-row raw INSERTs."""
    inputs = _publish_inputs(count)
    topic_row, rows = _publish_rows(inputs)

    def ours(check: bool) -> Sample:
        db = ws.fresh("b1-ours")
        publish = db.events.publish
        with stopwatch() as elapsed:
            with db.transaction() as tx:
                for message_id, body in inputs:
                    publish(WORKFLOW, TOPIC, message_id, body, tx=tx)
        digest = db_digest(db.connection, ("topics", "events")) if check else None
        ws.discard(db)
        return Sample(*elapsed, digest=digest)

    def baseline(check: bool) -> Sample:
        db = ws.fresh("b1-raw")
        execute = db.connection.execute
        with stopwatch() as elapsed:
            execute("BEGIN IMMEDIATE")
            execute(_INSERT_TOPIC, topic_row)
            for row in rows:
                execute(INSERT_EVENT, row)
            execute("COMMIT")
        digest = db_digest(db.connection, ("topics", "events")) if check else None
        ws.discard(db)
        return Sample(*elapsed, digest=digest)

    pair = measure_pair("B1", ours, baseline, reps)
    return [ratio_row("B1", f"publish {count:,} events, one tx (vs per-row raw INSERT)", pair,
                      limit=1.5, extra={"events": count})]


def b2_crr_cost(ws: Workspace, count: int, reps: int) -> list[Row]:
    """B2: executemany INSERT of `count` event rows, CRR table vs the plain schema."""
    rows = event_rows(count)

    def timed_insert(connection) -> list[float]:
        with stopwatch() as elapsed:
            connection.execute("BEGIN IMMEDIATE")
            for _ in connection.executemany(INSERT_EVENT, rows):
                pass
            connection.execute("COMMIT")
        return elapsed

    def crr(check: bool) -> Sample:
        db = ws.fresh("b2-crr")
        seconds = timed_insert(db.connection)
        digest = db_digest(db.connection, ("events",)) if check else None
        ws.discard(db)
        return Sample(*seconds, digest=digest)

    def plain(check: bool) -> Sample:
        path = ws.path("b2-plain")
        connection = plain_schema(path)
        try:
            seconds = timed_insert(connection)
            digest = db_digest(connection, ("events",)) if check else None
        finally:
            connection.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return Sample(*seconds, digest=digest)

    pair = measure_pair("B2", crr, plain, reps)
    return [ratio_row("B2", f"INSERT {count:,} events: CRR table vs same schema without crsql_as_crr", pair, limit=None, extra={"rows": count, "changes": count * CHANGES_PER_EVENT})]
