-- Devices and their current state. Times are Unix milliseconds (UTC) from the hub's
-- clock, except device_time, which is the device's own clock (kept to show skew).
CREATE TABLE devices (
    device_id         TEXT    NOT NULL PRIMARY KEY,
    status            TEXT    NOT NULL CHECK (status IN ('provisioning', 'online', 'offline', 'error')),
    last_seen_at      INTEGER,
    first_seen_at     INTEGER,
    status_changed_at INTEGER NOT NULL,
    registered_at     INTEGER NOT NULL,
    device_time       INTEGER,
    error             TEXT,
    uptime_seconds    INTEGER,
    free_memory       INTEGER,
    firmware_version  TEXT,
    hostname          TEXT,
    os_info           TEXT,  -- JSON object
    metrics           TEXT   -- JSON object {name: number}
) WITHOUT ROWID;

-- The offline checker's range scan: watched devices by deadline.
CREATE INDEX devices_status_last_seen ON devices (status, last_seen_at);

-- Every transition, and the outbox of status events: published_at stays NULL until
-- the broker has acknowledged the event.
CREATE TABLE status_events (
    seq             INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    device_id       TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    previous_status TEXT,
    reason          TEXT    NOT NULL,
    last_seen_at    INTEGER,
    changed_at      INTEGER NOT NULL,
    published_at    INTEGER
);

CREATE INDEX status_events_device ON status_events (device_id, seq);
CREATE INDEX status_events_unpublished ON status_events (seq) WHERE published_at IS NULL;
