-- The KMIP back ends' identity maps (see the sqlite set).
CREATE TABLE IF NOT EXISTS kmip_object (
    handle BIGSERIAL PRIMARY KEY,
    token TEXT NOT NULL, uid TEXT NOT NULL, cls BIGINT NOT NULL, attrs TEXT NOT NULL,
    UNIQUE (token, uid));
