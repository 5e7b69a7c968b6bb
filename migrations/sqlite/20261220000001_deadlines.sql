-- Per-device deadlines (interface.md "Deadlines"): a device may have its own
-- offline_after (set through the API) or declare its heartbeat interval; the store
-- keeps each device's deadline, written with last_seen_at, so the offline check reads
-- a range of deadlines. Times and durations in milliseconds.
ALTER TABLE devices ADD COLUMN offline_after_ms INTEGER;  -- the device's own setting
ALTER TABLE devices ADD COLUMN interval_ms INTEGER;       -- declared in its heartbeats
-- last_seen_at + its offline_after. Filled in at start-up, when the hub knows the
-- fleet's offline_after (and again whenever that changes).
ALTER TABLE devices ADD COLUMN deadline_at INTEGER;

DROP INDEX devices_status_last_seen;
-- The offline checker's range scan: watched devices by deadline.
CREATE INDEX devices_status_deadline ON devices (status, deadline_at);
