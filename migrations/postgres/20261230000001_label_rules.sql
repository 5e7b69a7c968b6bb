-- Label rules (interface.md "Deadlines"), as in migrations/sqlite: the offline_after,
-- in milliseconds, of the first `[[heartbeat.rules]]` entry whose labels the device
-- carries; NULL: none matches.
ALTER TABLE devices ADD COLUMN rule_ms bigint;
