-- Pool intents name the gateway process that wrote them, and every process on a shared
-- store holds a lease (renewed by its heartbeat): a process reconciles only its own
-- intents and those of processes whose lease ran out, never those of a live one that
-- is still creating their objects.
ALTER TABLE pool_intent ADD COLUMN owner TEXT;
CREATE TABLE IF NOT EXISTS gateway_lease (holder TEXT PRIMARY KEY, until REAL NOT NULL);
