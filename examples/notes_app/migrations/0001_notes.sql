-- A user's own two-table schema (the example of README "Testing your schema on several
-- replicas"). The engine's migration runner makes both tables CRRs: NOT NULL columns have
-- DEFAULTs, timestamps are INTEGER milliseconds, no UNIQUE index besides the primary key.

CREATE TABLE notebooks (
    id         TEXT    NOT NULL PRIMARY KEY,
    title      TEXT    NOT NULL DEFAULT '',
    archived   INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE notes (
    id          TEXT    NOT NULL PRIMARY KEY,
    notebook_id TEXT    NOT NULL DEFAULT '',
    body        TEXT    NOT NULL DEFAULT '',
    pinned      INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX notes_notebook ON notes (notebook_id);
