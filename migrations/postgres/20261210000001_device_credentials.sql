-- Logins to the embedded broker (mqtt.require_login): one row per device that has a
-- secret. Only a salted SHA-256 of the secret is kept (src/credentials.rs says why a
-- fast hash is enough). The foreign key removes a deleted device's row, and refuses
-- a credential for a device deleted at the same moment. Read by primary key on every
-- device login.
CREATE TABLE device_credentials (
    device_id   text  COLLATE "C" NOT NULL PRIMARY KEY
                      REFERENCES devices (device_id) ON DELETE CASCADE,
    salt        bytea NOT NULL,
    secret_hash bytea NOT NULL
);
