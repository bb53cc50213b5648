-- Resumable tunnels (PROTOCOL.md §2e).
-- A device's presence: `online` (its link is live), or `reconnecting` (the relay still
-- holds tunnels for it, while its link is gone or has fallen silent).
ALTER TABLE presence ADD COLUMN state TEXT NOT NULL DEFAULT 'online';
-- In a tunnel's audit row: how often it resumed on a new link, the bytes sent again, the
-- time it spent waiting for the device, and why its last resume failed (if it did).
ALTER TABLE tunnel_sessions ADD COLUMN resumes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tunnel_sessions ADD COLUMN replayed_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tunnel_sessions ADD COLUMN waited_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tunnel_sessions ADD COLUMN resume_failure TEXT;
