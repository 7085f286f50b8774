-- A local (never replicated: the `__` prefix) record of every topic's name, kept by triggers.
--
-- Why: a topic deleted on one replica while another publishes to it ends, after merge, as a
-- deleted topic row (cr-sqlite: a delete beats concurrent updates) plus the new events. The
-- after-merge audit (engine/replication.py) re-creates the topic row so those events stay
-- visible, and a topic's name cannot be derived from its id (a hash): it is kept here, for
-- topics created locally and merged alike (the triggers fire on both).
CREATE TABLE __engine_topic_names (
    id          TEXT    NOT NULL PRIMARY KEY,
    workflow_id TEXT    NOT NULL DEFAULT '',
    name        TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL DEFAULT 0
);

INSERT INTO __engine_topic_names (id, workflow_id, name, created_at)
    SELECT id, workflow_id, name, created_at FROM topics WHERE name <> '';

CREATE TRIGGER __engine_topic_names_insert AFTER INSERT ON topics WHEN NEW.name <> ''
BEGIN
    INSERT INTO __engine_topic_names (id, workflow_id, name, created_at)
        VALUES (NEW.id, NEW.workflow_id, NEW.name, NEW.created_at)
        ON CONFLICT (id) DO UPDATE SET workflow_id = excluded.workflow_id, name = excluded.name,
                                       created_at = excluded.created_at;
END;

CREATE TRIGGER __engine_topic_names_update AFTER UPDATE ON topics WHEN NEW.name <> ''
BEGIN
    INSERT INTO __engine_topic_names (id, workflow_id, name, created_at)
        VALUES (NEW.id, NEW.workflow_id, NEW.name, NEW.created_at)
        ON CONFLICT (id) DO UPDATE SET workflow_id = excluded.workflow_id, name = excluded.name,
                                       created_at = excluded.created_at;
END;
