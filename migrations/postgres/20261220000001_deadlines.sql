-- Per-device deadlines (interface.md "Deadlines"), as in migrations/sqlite: a device's
-- own offline_after, its declared heartbeat interval (milliseconds), and its deadline,
-- last_seen_at + its offline_after, written with last_seen_at and filled in at
-- start-up, when the hub knows the fleet's offline_after.
ALTER TABLE devices ADD COLUMN offline_after_ms bigint;
ALTER TABLE devices ADD COLUMN interval_ms bigint;
ALTER TABLE devices ADD COLUMN deadline_at timestamptz;

DROP INDEX devices_status_last_seen;
-- The offline check: watched devices by deadline, read as a range that costs what
-- it finds.
CREATE INDEX devices_status_deadline ON devices (status, deadline_at);
