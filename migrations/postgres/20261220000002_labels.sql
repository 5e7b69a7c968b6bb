-- Labels (interface.md "Labels"), as in migrations/sqlite: a jsonb object of strings,
-- NULL for none. No index: a GIN index would be written on every heartbeat (no row
-- update here is HOT: deadline_at is indexed), and a label filter is a listing.
ALTER TABLE devices ADD COLUMN labels jsonb;
