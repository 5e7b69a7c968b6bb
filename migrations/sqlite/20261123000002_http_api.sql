-- The device's clock minus the hub's at its latest timestamped heartbeat, in ms.
ALTER TABLE devices ADD COLUMN clock_skew_ms INTEGER;

-- Paging one status in id order (the API's ?status= filter). Only written when a
-- device's status changes, never on an ordinary heartbeat.
CREATE INDEX devices_status_id ON devices (status, device_id);

-- status_events rows with reason 'deleted' are tombstones: a deleted device's
-- retained status is cleared by publishing an empty retained message, in outbox
-- order. They are never shown as history.
