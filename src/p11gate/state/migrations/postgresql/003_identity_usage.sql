-- Connections and sessions per identity and gateway process (see the sqlite set).
CREATE TABLE IF NOT EXISTS identity_usage (
    holder TEXT NOT NULL, who TEXT NOT NULL,
    connections BIGINT NOT NULL DEFAULT 0, sessions BIGINT NOT NULL DEFAULT 0,
    until DOUBLE PRECISION NOT NULL, PRIMARY KEY (holder, who));
CREATE INDEX IF NOT EXISTS identity_usage_who ON identity_usage (who);
