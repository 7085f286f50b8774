-- The five execution stores. Every table here becomes a CRR (the migration runner checks
-- the CRR rules and calls crsql_as_crr). Rules: every column NOT NULL with a DEFAULT
-- ('' / 0 / '[]' / '{}' mean "no value"), no UNIQUE besides the primary key, timestamps
-- in integer milliseconds. Natural uniqueness comes from deterministic ids (DESIGN.md §7).

CREATE TABLE topics (
    id          TEXT    NOT NULL PRIMARY KEY,   -- hash of (workflow_id, name)
    workflow_id TEXT    NOT NULL DEFAULT '',
    name        TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX topics_workflow ON topics (workflow_id);

CREATE TABLE events (
    id                 TEXT    NOT NULL PRIMARY KEY,   -- hash of (topic_id, message_id)
    topic_id           TEXT    NOT NULL DEFAULT '',
    workflow_id        TEXT    NOT NULL DEFAULT '',
    message_id         TEXT    NOT NULL DEFAULT '',
    title              TEXT    NOT NULL DEFAULT '',
    payload            TEXT    NOT NULL DEFAULT '{}',  -- JSON
    status             TEXT    NOT NULL DEFAULT 'pending',
    reserved_by_run_id TEXT    NOT NULL DEFAULT '',
    created_by_run_id  TEXT    NOT NULL DEFAULT '',
    attempt_number     INTEGER NOT NULL DEFAULT 1,
    caused_by          TEXT    NOT NULL DEFAULT '[]',  -- JSON list of event ids
    created_at         INTEGER NOT NULL DEFAULT 0,
    updated_at         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_topic_status ON events (topic_id, status);
CREATE INDEX events_workflow ON events (workflow_id);
CREATE INDEX events_reserved_by ON events (reserved_by_run_id);

CREATE TABLE handler_runs (
    id               TEXT    NOT NULL PRIMARY KEY,   -- uuid4 hex: a run has no natural key
    script_run_id    TEXT    NOT NULL DEFAULT '',
    workflow_id      TEXT    NOT NULL DEFAULT '',
    handler_type     TEXT    NOT NULL DEFAULT '',
    handler_name     TEXT    NOT NULL DEFAULT '',
    phase            TEXT    NOT NULL DEFAULT 'pending',
    status           TEXT    NOT NULL DEFAULT 'active',
    retry_of         TEXT    NOT NULL DEFAULT '',
    mutation_outcome TEXT    NOT NULL DEFAULT '',
    prepare_result   TEXT    NOT NULL DEFAULT '',    -- JSON, '' = none yet
    input_state      TEXT    NOT NULL DEFAULT '',
    output_state     TEXT    NOT NULL DEFAULT '',
    start_timestamp  INTEGER NOT NULL DEFAULT 0,
    end_timestamp    INTEGER NOT NULL DEFAULT 0,
    error            TEXT    NOT NULL DEFAULT '',
    error_type       TEXT    NOT NULL DEFAULT '',
    cost             REAL    NOT NULL DEFAULT 0,
    logs             TEXT    NOT NULL DEFAULT '[]'   -- JSON list
);
CREATE INDEX handler_runs_script_run ON handler_runs (script_run_id);
CREATE INDEX handler_runs_workflow ON handler_runs (workflow_id);
CREATE INDEX handler_runs_phase ON handler_runs (phase);
CREATE INDEX handler_runs_status ON handler_runs (status);
CREATE INDEX handler_runs_retry_of ON handler_runs (retry_of);

CREATE TABLE mutations (
    id                 TEXT    NOT NULL PRIMARY KEY,   -- hash of handler_run_id: one per run
    handler_run_id     TEXT    NOT NULL DEFAULT '',
    workflow_id        TEXT    NOT NULL DEFAULT '',
    tool_namespace     TEXT    NOT NULL DEFAULT '',
    tool_method        TEXT    NOT NULL DEFAULT '',
    params             TEXT    NOT NULL DEFAULT '{}',  -- JSON
    idempotency_key    TEXT    NOT NULL DEFAULT '',
    status             TEXT    NOT NULL DEFAULT 'pending',
    result             TEXT    NOT NULL DEFAULT '',    -- JSON, '' = none yet
    error              TEXT    NOT NULL DEFAULT '',
    reconcile_attempts INTEGER NOT NULL DEFAULT 0,
    last_reconcile_at  INTEGER NOT NULL DEFAULT 0,
    next_reconcile_at  INTEGER NOT NULL DEFAULT 0,
    resolved_by        TEXT    NOT NULL DEFAULT '',
    resolved_at        INTEGER NOT NULL DEFAULT 0,
    ui_title           TEXT    NOT NULL DEFAULT '',
    created_at         INTEGER NOT NULL DEFAULT 0,
    updated_at         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX mutations_handler_run ON mutations (handler_run_id);
CREATE INDEX mutations_workflow ON mutations (workflow_id);
CREATE INDEX mutations_status ON mutations (status);

CREATE TABLE handler_state (
    id                TEXT    NOT NULL PRIMARY KEY,   -- hash of (workflow_id, handler_name)
    workflow_id       TEXT    NOT NULL DEFAULT '',
    handler_name      TEXT    NOT NULL DEFAULT '',
    state             TEXT    NOT NULL DEFAULT '{}',  -- JSON
    wake_at           INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL DEFAULT 0,
    updated_by_run_id TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX handler_state_workflow ON handler_state (workflow_id);
CREATE INDEX handler_state_wake_at ON handler_state (wake_at);
