-- What running the same execution model on several replicas needs (DESIGN.md §7).

-- One row per workflow: which replica may reserve its events and start its runs.
-- The owner and the time of the claim live together in ONE JSON column, `claim`: per-column
-- last-writer-wins could otherwise merge the owner of one concurrent claim with the time of
-- the other. '' means unowned (released).
CREATE TABLE ownership (
    workflow_id TEXT NOT NULL PRIMARY KEY,
    claim       TEXT NOT NULL DEFAULT ''   -- JSON {"owner": site_id, "claimed_at": ms} or ''
);

-- Violations found after a merge (two replicas reserved one event, two active runs of one
-- workflow, a run advanced by a non-owner). The id is derived from kind and subjects, so the
-- same conflict found on two replicas is one row after they sync.
CREATE TABLE conflicts (
    id          TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL DEFAULT '',
    workflow_id TEXT    NOT NULL DEFAULT '',
    subjects    TEXT    NOT NULL DEFAULT '[]',  -- JSON list of the ids involved
    detail      TEXT    NOT NULL DEFAULT '{}',  -- JSON
    status      TEXT    NOT NULL DEFAULT 'open',
    detected_at INTEGER NOT NULL DEFAULT 0,
    detected_by TEXT    NOT NULL DEFAULT '',
    resolved_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX conflicts_workflow ON conflicts (workflow_id);
CREATE INDEX conflicts_status ON conflicts (status);
