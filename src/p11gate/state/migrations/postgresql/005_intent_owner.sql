-- Pool intent owners and gateway leases (see the sqlite set).
ALTER TABLE pool_intent ADD COLUMN IF NOT EXISTS owner TEXT;
CREATE TABLE IF NOT EXISTS gateway_lease (holder TEXT PRIMARY KEY,
    until DOUBLE PRECISION NOT NULL);
