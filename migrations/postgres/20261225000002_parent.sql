-- Dependencies (interface.md "Dependencies"), as in migrations/sqlite: a gateway's id,
-- NULL for none. No update of a device row is HOT (deadline_at is indexed), so every
-- index gets an entry per heartbeat; partial, this one only for devices that name a
-- parent.
ALTER TABLE devices ADD COLUMN parent text COLLATE "C";
CREATE INDEX devices_parent ON devices (parent, device_id) WHERE parent IS NOT NULL;
