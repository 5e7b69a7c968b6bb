-- Dependencies (interface.md "Dependencies"): the device a device is reached through,
-- a gateway's id, from its heartbeats and the API. NULL: none. The index lists a
-- gateway's children in id order; partial, so the heartbeats of the many devices
-- that name no parent never touch it.
ALTER TABLE devices ADD COLUMN parent TEXT;
CREATE INDEX devices_parent ON devices (parent, device_id) WHERE parent IS NOT NULL;
