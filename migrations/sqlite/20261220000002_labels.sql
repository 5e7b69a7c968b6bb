-- Labels (interface.md "Labels"): a JSON object of strings, set key by key by the
-- device's heartbeats and as a whole through the API. NULL: none. No index: a label
-- filter reads devices in id order until its page is full.
ALTER TABLE devices ADD COLUMN labels TEXT;
