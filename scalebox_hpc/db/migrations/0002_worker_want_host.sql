-- Location-aware scheduling (HOST-BOUND modules): the host a worker was sent to.
-- A worker's 'host' is known only once it starts; until then the controller must still
-- count a pending worker on the host it asked for, or it would send one more there.
ALTER TABLE workers ADD COLUMN want_host text;

-- The controller counts ready tasks per to_host each step, and a gone host's tasks are
-- found by it: only tasks addressed to a host are in this index.
CREATE INDEX tasks_ready_host ON tasks (module_id, to_host) WHERE status = -1 AND to_host IS NOT NULL;
