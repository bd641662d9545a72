-- The KMIP back ends' identity maps (backends/kmip/idmap.py): gateway handle <-> the
-- server's unique identifier, with the object's public attributes (JSON). One map for
-- every process and node on the store, so that a handle names one object everywhere.
CREATE TABLE IF NOT EXISTS kmip_object (
    handle INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL, uid TEXT NOT NULL, cls INTEGER NOT NULL, attrs TEXT NOT NULL,
    UNIQUE (token, uid));
