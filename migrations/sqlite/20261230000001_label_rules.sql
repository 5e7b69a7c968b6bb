-- Label rules (interface.md "Deadlines"): the offline_after, in milliseconds, of the
-- first `[[heartbeat.rules]]` entry whose labels the device carries; NULL: none
-- matches. Written by the hub whenever the device's labels change, and at start when
-- the rules have changed, so the deadline is computed from columns in the write.
ALTER TABLE devices ADD COLUMN rule_ms INTEGER;
