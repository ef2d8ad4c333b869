-- Jobs are also the queue: status, run_at, attempts and the lease live on the row.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    user_id          text        NOT NULL,
    kind             text        NOT NULL,
    input            jsonb       NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'canceled')),
    progress         integer,
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL,
    result           jsonb,
    error_code       text,
    error_message    text,
    callback_url     text,
    notify           jsonb,
    idempotency_key  text,
    request_hash     text,
    run_at           timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    CONSTRAINT jobs_idempotency_key UNIQUE (user_id, idempotency_key)
);
CREATE INDEX jobs_due_idx ON jobs (run_at, id) WHERE status = 'pending';
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX jobs_user_idx ON jobs (user_id, id);

-- Per-user update log. The counter row serializes appends per user, so seq order is commit order.
CREATE TABLE user_seqs (
    user_id  text   PRIMARY KEY,
    last_seq bigint NOT NULL
);
CREATE TABLE updates (
    id            uuid        PRIMARY KEY,
    user_id       text        NOT NULL,
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    tracking_id   uuid,
    status        text,
    data          jsonb,
    notification  jsonb,
    created_at    timestamptz NOT NULL,
    CONSTRAINT updates_user_seq UNIQUE (user_id, seq)
);
CREATE INDEX updates_created_idx ON updates (created_at);
