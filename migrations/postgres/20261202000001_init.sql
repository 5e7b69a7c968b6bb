-- The PostgreSQL schema: the same tables and columns as migrations/sqlite, with
-- PostgreSQL's own types (times as timestamptz, ids as uuid, reports as jsonb).
-- Times come from the hub's clock, except device_time, which is the device's own
-- clock (kept to show skew).
CREATE TABLE devices (
    -- COLLATE "C": ids compare bytewise, as in SQLite, so id order, prefix ranges and
    -- page cursors agree between backends whatever the database's locale.
    device_id         text        COLLATE "C" NOT NULL PRIMARY KEY,
    status            text        NOT NULL CHECK (status IN ('provisioning', 'online', 'offline', 'error')),
    last_seen_at      timestamptz,
    first_seen_at     timestamptz,
    status_changed_at timestamptz NOT NULL,
    registered_at     timestamptz NOT NULL,
    device_time       timestamptz,
    clock_skew_ms     bigint,
    error             text,
    uptime_seconds    bigint,
    free_memory       bigint,
    firmware_version  text,
    hostname          text,
    os_info           jsonb,
    metrics           jsonb
);

-- The offline check: watched devices by deadline, read as a range that costs what
-- it finds.
CREATE INDEX devices_status_last_seen ON devices (status, last_seen_at);
-- Paging one status in id order (the API's ?status= filter).
CREATE INDEX devices_status_id ON devices (status, device_id);

-- Every transition, and the outbox of status events: published_at stays NULL until
-- the broker has acknowledged the event. Rows with reason 'deleted' are tombstones:
-- a deleted device's retained status is cleared in outbox order; never history.
--
-- seq is the commit order as well as the insert order: every transaction that adds
-- events takes the advisory lock the store names (OUTBOX_LOCK) before its first
-- insert and holds it until it commits, so a reader following seq never passes a
-- number whose row has yet to commit (the publisher and each sink keep a cursor).
CREATE TABLE status_events (
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    device_id       text        COLLATE "C" NOT NULL,
    status          text        NOT NULL,
    previous_status text,
    reason          text        NOT NULL,
    last_seen_at    timestamptz,
    changed_at      timestamptz NOT NULL,
    published_at    timestamptz
);

CREATE INDEX status_events_device ON status_events (device_id, seq);
CREATE INDEX status_events_unpublished ON status_events (seq) WHERE published_at IS NULL;

-- Notification sinks (interface.md "Notifications"): each sink has a cursor into the
-- event log and moves matching events into its queue and its cursor past them in one
-- transaction, so every transition is queued for each sink exactly once.
CREATE TABLE notify_sinks (
    sink     text    NOT NULL PRIMARY KEY,
    last_seq bigint  NOT NULL,
    -- Set at run time through the API; NULL follows the configuration.
    enabled  boolean
);

-- Each sink's queue: pending until delivered (then deleted) or given up on ('dead',
-- kept for an operator to retry or drop). `body` is rendered once, when queued.
CREATE TABLE notifications (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink            text        NOT NULL,
    event_seq       bigint      NOT NULL,
    device_id       text        COLLATE "C" NOT NULL,
    event_id        uuid        NOT NULL,
    kind            text        NOT NULL,
    body            text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('pending', 'dead')),
    attempts        bigint      NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    last_error      text,
    UNIQUE (sink, event_seq)
);

-- A device's oldest pending notification: the one that may be sent (order per device).
CREATE INDEX notifications_device ON notifications (sink, device_id, state, id);
-- The queue in order, read oldest first a page at a time.
CREATE INDEX notifications_queue ON notifications (sink, state, id);
