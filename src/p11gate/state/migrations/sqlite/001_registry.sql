-- The registry as components created it before migrations were versioned: every
-- statement is IF NOT EXISTS, so a registry from an earlier release is taken over as is.
CREATE TABLE IF NOT EXISTS object_owner (
    token TEXT NOT NULL, class INTEGER NOT NULL, id BLOB NOT NULL, label BLOB NOT NULL,
    owner TEXT NOT NULL, created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (token, class, id, label));
CREATE TABLE IF NOT EXISTS pin_override (
    token TEXT NOT NULL, who TEXT NOT NULL, hash TEXT NOT NULL,
    replaced TEXT NOT NULL, PRIMARY KEY (token, who));
CREATE TABLE IF NOT EXISTS pool_intent (
    pool TEXT NOT NULL, intent INTEGER NOT NULL, state TEXT NOT NULL,
    objects TEXT NOT NULL, unsettled TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (pool, intent));
CREATE TABLE IF NOT EXISTS pool_object (
    pool TEXT NOT NULL, oid INTEGER NOT NULL, class INTEGER NOT NULL,
    id BLOB, label BLOB, uid BLOB, PRIMARY KEY (pool, oid));
CREATE TABLE IF NOT EXISTS pool_object_state (
    pool TEXT NOT NULL, oid INTEGER NOT NULL, origin TEXT, pinned TEXT,
    destroyed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (pool, oid));
CREATE TABLE IF NOT EXISTS pool_object_stale (
    pool TEXT NOT NULL, oid INTEGER NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (pool, oid, member));
