-- Logins to the embedded broker (mqtt.require_login): one row per device that has a
-- secret. Only a salted SHA-256 of the secret is kept (src/credentials.rs says why a
-- fast hash is enough). Deleting a device deletes its row (the store does it in the
-- same transaction). Read by primary key on every device login.
CREATE TABLE device_credentials (
    device_id   TEXT NOT NULL PRIMARY KEY,
    salt        BLOB NOT NULL,
    secret_hash BLOB NOT NULL
) WITHOUT ROWID;
