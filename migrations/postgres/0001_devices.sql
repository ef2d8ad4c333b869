-- Devices: one row per (platform, token); users are external (the JWT `sub`).
CREATE TABLE devices (
    id              uuid PRIMARY KEY,
    user_id         text        NOT NULL,
    platform        text        NOT NULL CHECK (platform IN ('apns', 'fcm')),
    token           text        NOT NULL,
    environment     text        CHECK (environment IN ('production', 'sandbox')),
    app_id          text        NOT NULL,
    locale          text,
    app_version     text,
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'invalid')),
    invalid_reason  text,
    created_at      timestamptz NOT NULL,
    -- last time the app (re)registered this token; an APNs 410 older than this is ignored
    registered_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    last_push_at    timestamptz,
    CONSTRAINT devices_platform_token_key UNIQUE (platform, token)
);
CREATE INDEX devices_user_idx ON devices (user_id, created_at);
