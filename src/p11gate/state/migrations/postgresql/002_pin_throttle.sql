-- PIN attempts per token and identity, shared by every node (see the sqlite set).
CREATE TABLE IF NOT EXISTS pin_throttle (
    token TEXT NOT NULL, who TEXT NOT NULL,
    fails BIGINT NOT NULL DEFAULT 0, inflight BIGINT NOT NULL DEFAULT 0,
    inflight_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    next_lock DOUBLE PRECISION NOT NULL, PRIMARY KEY (token, who));
