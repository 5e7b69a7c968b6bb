-- Silences (interface.md "Silences"): maintenance windows over a list of devices
-- (a JSON array of ids), an id pattern or labels (a JSON object); exactly one of the
-- three is set. Times are Unix milliseconds. The alert policy reads the silences not
-- yet ended on every pass (ends_at > now), hence the index on ends_at; ended ones are
-- kept, as a record. AUTOINCREMENT: an id is never given twice.
CREATE TABLE silences (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    device_ids TEXT,
    pattern    TEXT,
    labels     TEXT,
    starts_at  INTEGER NOT NULL,
    ends_at    INTEGER NOT NULL,
    comment    TEXT,
    created_at INTEGER NOT NULL,
    CHECK ((device_ids IS NOT NULL) + (pattern IS NOT NULL) + (labels IS NOT NULL) = 1),
    CHECK (ends_at >= starts_at)
);
CREATE INDEX silences_ends_at ON silences (ends_at);
