-- A delivered push leaves the outbox. Its row is deleted and its outcome appended here,
-- instead of the row being rewritten as sent. That rewrite could never be HOT (the status is
-- in the outbox's partial indexes' predicates), so every one added a primary-key entry, and
-- the later clean-up of those entries was a third of the server's time per push. A delete
-- only marks the row, and this table has no B-tree to maintain. The BRIN index serves the
-- retention purge, which deletes by update id range (ids are UUIDv7: see 0008).
-- Rows already sent stay in deliveries until the purge takes them.
CREATE TABLE sent_deliveries (
    update_id   uuid        NOT NULL,
    device_id   uuid        NOT NULL,
    user_id     text        NOT NULL,
    attempts    integer     NOT NULL,
    provider_id text,
    created_at  timestamptz NOT NULL,
    sent_at     timestamptz NOT NULL
);
CREATE INDEX sent_deliveries_update_brin ON sent_deliveries USING brin (update_id);
