-- API keys may expire; device keys can be rotated with a grace period for the old one.
-- Keep in step with ../postgres/0002_expiry_rotation.sql.
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE devices ADD COLUMN prev_key_hash TEXT;
ALTER TABLE devices ADD COLUMN prev_key_until BIGINT;
CREATE INDEX devices_prev_key_hash ON devices(prev_key_hash);
