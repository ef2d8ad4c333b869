-- Queue tables under real maintenance (autovacuum on, a VACUUM at any moment).
--
-- 1. The claims' plans do not depend on table statistics. A claim must walk its due index in
--    order, stop after the batch, and update the rows it picked by their addresses. With
--    statistics taken while the queue was nearly empty, the planner rated other plans as cheap
--    (a scan of every pending row, then a sort; or the update walking a partial index and
--    filtering by address) and, after a VACUUM, chose them: their cost grows with the backlog
--    (seconds per claim at a backlog of 900,000). Each claim is therefore a function planned
--    with sorts, sequential and bitmap scans disabled. The selection can then only be the
--    ordered scan of its due index, and the update, which names no indexed condition, only a
--    TID scan of the addresses selected.
CREATE FUNCTION herald_claim_deliveries(
    owner text, lease_until timestamptz, due_by timestamptz, max_rows bigint)
RETURNS TABLE (c_update_id uuid, c_device_id uuid, c_user_id text, c_attempts integer,
               c_status text, c_row_id tid)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
BEGIN
    -- Rows picked are locked, so still pending here. A delivery whose device was deleted while
    -- its update was being appended (deliveries carry no foreign keys: migration 0005) is
    -- dropped instead of sent.
    RETURN QUERY
    WITH picked AS (
        UPDATE deliveries d SET
            (status, attempts, lease_owner, lease_expires_at, last_error) = (SELECT
                CASE WHEN v.id IS NULL THEN 'dropped' ELSE 'sending' END,
                d.attempts + CASE WHEN v.id IS NULL THEN 0 ELSE 1 END,
                CASE WHEN v.id IS NULL THEN NULL ELSE owner END,
                CASE WHEN v.id IS NULL THEN NULL ELSE lease_until END,
                CASE WHEN v.id IS NULL THEN 'device deleted' ELSE d.last_error END
                FROM (SELECT d.device_id) one (device_id)
                LEFT JOIN devices v ON v.id = one.device_id),
            updated_at = due_by
        WHERE d.ctid = ANY(ARRAY(
            SELECT ctid FROM deliveries
            WHERE status = 'pending' AND next_attempt_at <= due_by
            ORDER BY next_attempt_at
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED))
        RETURNING d.update_id, d.device_id, d.user_id, d.attempts, d.status, d.ctid)
    SELECT * FROM picked;
END
$$;

CREATE FUNCTION herald_claim_jobs(
    owner text, lease_until timestamptz, due_by timestamptz, max_rows bigint, kinds text[])
RETURNS SETOF jobs
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
    WITH picked AS (
        UPDATE jobs j SET status = 'processing', attempts = j.attempts + 1, lease_owner = owner,
            lease_expires_at = lease_until, updated_at = due_by
        WHERE j.ctid = ANY(ARRAY(
            SELECT ctid FROM jobs
            WHERE status = 'pending' AND run_at <= due_by AND kind = ANY(kinds)
            ORDER BY run_at, id
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED))
        RETURNING j.*)
    SELECT * FROM picked;
END
$$;

-- 2. No statement that fences on a status can be planned as a walk of an in-flight index. The
--    in-flight indexes were partial on the status (`status = 'sending'`, `'processing'`), so
--    every statement naming that status in its fence (a Sent batch, an outcome, a job's
--    completion) could use them; with statistics saying little was in flight, the planner
--    walked the whole index (every lease since the last vacuum) instead of finding rows by
--    address or key: a Sent batch of 512 took 35-72 ms instead of 5. They are now partial on
--    the lease itself, which is set exactly while a row is in flight: the lease expiry scans
--    (`lease_expires_at <= now`) still use them, a status fence no longer can.
CREATE INDEX deliveries_in_flight_idx ON deliveries (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
DROP INDEX deliveries_sending_idx;
CREATE INDEX jobs_leased_idx ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
DROP INDEX jobs_lease_idx;

-- 3. Autovacuum sized for queues. The default waits for a fifth of a table to be dead; a
--    queue's live rows are few and its dead rows many, so it would wait for millions. These
--    tables are vacuumed after a fixed number of dead rows, without the cost-based pauses
--    (each vacuum is small and frequent), and analyzed as often.
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE jobs SET (
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0, fillfactor = 85);
-- 4. Hot single rows updated in place: a user's seq counter on every append, a device's
--    last push time, its sync cursor. None of the updated columns is indexed, so with free room
--    on the page each update is HOT (no index entry, pruned on the page itself). A low
--    fillfactor keeps that room; these tables hold one short row per user or device.
ALTER TABLE user_seqs SET (
    fillfactor = 20, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE devices SET (fillfactor = 70, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE device_cursors SET (
    fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0);
-- A new fillfactor applies to pages written from now on; rewrite the two counter tables once so
-- it applies to their existing rows too (one short row per user or device; VACUUM FULL cannot
-- run inside a migration's transaction, CLUSTER can).
CLUSTER user_seqs USING user_seqs_pkey;
CLUSTER device_cursors USING device_cursors_pkey;
