-- The device's error text at a transition to `error`, kept with the event: the
-- device's row is overwritten by its next heartbeat (a quick recovery clears the
-- text), so a sink or a subscriber that reads the event later still has it. NULL for
-- every other transition and for events written before this column existed.
ALTER TABLE status_events ADD COLUMN error text;
