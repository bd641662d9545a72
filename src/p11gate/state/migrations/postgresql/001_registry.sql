-- The registry's tables (see the sqlite set): 64-bit integers, since PKCS#11 classes and
-- object ids go beyond PostgreSQL's INTEGER.
CREATE TABLE IF NOT EXISTS object_owner (
    token TEXT NOT NULL, class BIGINT NOT NULL, id BYTEA NOT NULL, label BYTEA NOT NULL,
    owner TEXT NOT NULL, created DOUBLE PRECISION NOT NULL
        DEFAULT (extract(epoch FROM now()) / 86400.0 + 2440587.5),
    PRIMARY KEY (token, class, id, label));
CREATE TABLE IF NOT EXISTS pin_override (
    token TEXT NOT NULL, who TEXT NOT NULL, hash TEXT NOT NULL,
    replaced TEXT NOT NULL, PRIMARY KEY (token, who));
CREATE TABLE IF NOT EXISTS pool_intent (
    pool TEXT NOT NULL, intent BIGINT NOT NULL, state TEXT NOT NULL,
    objects TEXT NOT NULL, unsettled TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (pool, intent));
CREATE TABLE IF NOT EXISTS pool_object (
    pool TEXT NOT NULL, oid BIGINT NOT NULL, class BIGINT NOT NULL,
    id BYTEA, label BYTEA, uid BYTEA, PRIMARY KEY (pool, oid));
CREATE TABLE IF NOT EXISTS pool_object_state (
    pool TEXT NOT NULL, oid BIGINT NOT NULL, origin TEXT, pinned TEXT,
    destroyed BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (pool, oid));
CREATE TABLE IF NOT EXISTS pool_object_stale (
    pool TEXT NOT NULL, oid BIGINT NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (pool, oid, member));
