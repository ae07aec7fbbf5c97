-- Cross-site forwarding (multi-site apps): what each attempt sent to other sites'
-- inboxes before its messages were committed. forwards: one object per destination
-- site {site, path, files, bytes, seconds, tries, mode}.
ALTER TABLE task_exec ADD COLUMN forward_bytes bigint;
ALTER TABLE task_exec ADD COLUMN forward_files integer;
ALTER TABLE task_exec ADD COLUMN forwards jsonb;
