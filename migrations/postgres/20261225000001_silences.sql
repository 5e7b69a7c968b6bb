-- Silences (interface.md "Silences"), as in migrations/sqlite: a list of devices
-- (a jsonb array of ids), an id pattern or labels (a jsonb object), exactly one of
-- them set. The alert policy reads the silences not yet ended on every pass
-- (ends_at > now), hence the index on ends_at; ended ones are kept, as a record.
CREATE TABLE silences (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_ids jsonb,
    pattern    text,
    labels     jsonb,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    comment    text,
    created_at timestamptz NOT NULL,
    CHECK (num_nonnulls(device_ids, pattern, labels) = 1),
    CHECK (ends_at >= starts_at)
);
CREATE INDEX silences_ends_at ON silences (ends_at);
