-- The browser terminal (PROTOCOL.md §5).
-- A key minted by a relay for one terminal session: the device's authorized-keys lookup
-- returns it for `login` on that device only, until `expires_at` or until the relay's SSH
-- client has authenticated (the row is then deleted). In the store so that any relay of a
-- cluster answers the lookup.
CREATE TABLE ephemeral_keys (
    id           TEXT PRIMARY KEY,
    device_uuid  TEXT NOT NULL,
    login        TEXT NOT NULL,
    user_id      BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    public_key   TEXT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX ephemeral_keys_device ON ephemeral_keys(device_uuid, login);
-- What opened a tunnel: `connect` (a CONNECT) or `terminal` (the browser terminal).
ALTER TABLE tunnel_sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'connect';
-- The account the device's agent says its sshd logs people in as (`root` with root logins
-- on); none means each user's own cloud username.
ALTER TABLE presence ADD COLUMN ssh_login TEXT;
