-- Transactional outbox: one row per update x active device, written with the update.
CREATE TABLE deliveries (
    update_id        uuid        NOT NULL REFERENCES updates (id) ON DELETE CASCADE,
    device_id        uuid        NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    user_id          text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'dropped')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    provider_id      text,
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (update_id, device_id)
);
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_sending_idx ON deliveries (lease_expires_at) WHERE status = 'sending';
CREATE INDEX deliveries_device_idx ON deliveries (device_id);
CREATE INDEX deliveries_updated_idx ON deliveries (updated_at);

-- What each device has seen (POST /v1/updates/ack); monotonic.
CREATE TABLE device_cursors (
    device_id uuid   PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    seq       bigint NOT NULL
);
