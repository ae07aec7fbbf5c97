-- Upstream's extra-attrs.yaml: what a program adds to its attempt's record, kept as it
-- is (upstream's 'extras' field).
ALTER TABLE task_exec ADD COLUMN extras jsonb;
