-- Cloudlink schema, SQLite dialect. Keep in step with ../postgres/0001_init.sql.
-- Timestamps are Unix milliseconds (BIGINT) and flags are 0/1 INTEGERs in both dialects, so one
-- set of queries (src/store/sql.rs) serves both.

CREATE TABLE users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    username    TEXT NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);

CREATE TABLE ssh_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title        TEXT NOT NULL,
    public_key   TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    UNIQUE (user_id, fingerprint)
);

CREATE TABLE fleets (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT NOT NULL UNIQUE,
    allowed_ports  TEXT NOT NULL DEFAULT '',
    created_at     BIGINT NOT NULL
);

CREATE TABLE fleet_members (
    fleet_id  BIGINT NOT NULL REFERENCES fleets(id) ON DELETE CASCADE,
    user_id   BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role      TEXT NOT NULL CHECK (role IN ('owner', 'member')),
    PRIMARY KEY (fleet_id, user_id)
);
CREATE INDEX fleet_members_user ON fleet_members(user_id);

CREATE TABLE devices (
    uuid        TEXT PRIMARY KEY,
    fleet_id    BIGINT NOT NULL REFERENCES fleets(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    last_seen   BIGINT
);
CREATE INDEX devices_fleet ON devices(fleet_id);
CREATE UNIQUE INDEX devices_key_hash ON devices(key_hash);

CREATE TABLE relays (
    id            TEXT PRIMARY KEY,
    peer_addr     TEXT NOT NULL,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL
);

CREATE TABLE presence (
    device_uuid   TEXT PRIMARY KEY REFERENCES devices(uuid) ON DELETE CASCADE,
    relay_id      TEXT NOT NULL,
    session       TEXT NOT NULL,
    connected_at  BIGINT NOT NULL
);
CREATE INDEX presence_relay ON presence(relay_id);

-- Audit rows outlive the users and devices they name, so no foreign keys here.
CREATE TABLE tunnel_sessions (
    id            TEXT PRIMARY KEY,
    user_id       BIGINT NOT NULL,
    username      TEXT NOT NULL,
    device_uuid   TEXT NOT NULL,
    port          INTEGER NOT NULL,
    relay_id      TEXT NOT NULL,
    opened_at     BIGINT NOT NULL,
    closed_at     BIGINT,
    bytes_up      BIGINT NOT NULL DEFAULT 0,
    bytes_down    BIGINT NOT NULL DEFAULT 0,
    close_reason  TEXT
);
CREATE INDEX tunnel_sessions_user ON tunnel_sessions(user_id, opened_at);
CREATE INDEX tunnel_sessions_opened ON tunnel_sessions(opened_at);
