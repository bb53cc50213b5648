-- Cluster mode: secrets every relay must share, each relay's state for GET /v1/relays,
-- and which relay held the device of a forwarded tunnel.
CREATE TABLE cluster_secrets (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
ALTER TABLE relays ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
ALTER TABLE relays ADD COLUMN devices BIGINT NOT NULL DEFAULT 0;
ALTER TABLE relays ADD COLUMN tunnels BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tunnel_sessions ADD COLUMN device_relay TEXT;
