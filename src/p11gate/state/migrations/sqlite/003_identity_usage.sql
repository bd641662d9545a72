-- Connections and sessions per identity, one row per gateway process (holder) that
-- has any, so that the per-identity quotas hold across processes and nodes. until: the
-- lease (seconds since the epoch), renewed by the holder's heartbeat; rows of a holder
-- that died stop counting when it runs out.
CREATE TABLE IF NOT EXISTS identity_usage (
    holder TEXT NOT NULL, who TEXT NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0, sessions INTEGER NOT NULL DEFAULT 0,
    until REAL NOT NULL, PRIMARY KEY (holder, who));
CREATE INDEX IF NOT EXISTS identity_usage_who ON identity_usage (who);
