-- Finished deliveries now leave with their update (ON DELETE CASCADE) when the retention purge
-- deletes it, so nothing looks deliveries up by updated_at: the index only cost every claim and
-- every recorded outcome an extra index write.
DROP INDEX deliveries_updated_idx;
