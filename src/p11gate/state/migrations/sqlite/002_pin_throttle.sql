-- PIN attempts per token and identity, shared by every process on the store: an attempt
-- takes a slot (inflight) with one conditional UPDATE before its PIN is checked, so
-- processes cannot together check more than max_pin_failures in a row. Times are
-- seconds since the epoch (wall clock: the same on every process and node).
-- inflight_until: slots of a process that died are given back after it.
CREATE TABLE IF NOT EXISTS pin_throttle (
    token TEXT NOT NULL, who TEXT NOT NULL,
    fails INTEGER NOT NULL DEFAULT 0, inflight INTEGER NOT NULL DEFAULT 0,
    inflight_until REAL NOT NULL DEFAULT 0, locked_until REAL NOT NULL DEFAULT 0,
    next_lock REAL NOT NULL, PRIMARY KEY (token, who));
