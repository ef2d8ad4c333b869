-- As PostgreSQL's 0011: the in-flight indexes are partial on the lease, set exactly while a row
-- is in flight, instead of on the status. Once ANALYZE had run (by an operator, or `PRAGMA
-- optimize`), SQLite's planner read that few rows were in flight and planned the Sent batch
-- (`... AND status = 'sending'`) as a walk of the in-flight index, probing the whole batch for
-- each row in flight: the writer fell to a third of its rate and acknowledgments waited 10-40 s
-- (the soak benchmark, docs/benchmarks.md). A status fence can no longer use these indexes; the
-- lease expiry scans (`lease_expires_at <= now`) still do.
CREATE INDEX deliveries_in_flight_idx ON deliveries (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
DROP INDEX deliveries_sending_idx;
CREATE INDEX jobs_leased_idx ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
DROP INDEX jobs_lease_idx;
