-- Only pending deliveries are looked up by device (a dead token dropping what was queued for it;
-- a device's deletion, which finds its in-flight ones through deliveries_sending_idx, holding
-- only those). Deliveries handed to the dispatcher as they are appended are written as sending
-- and leave as sent, so they never enter this index: before, every delivery wrote an entry at
-- a random place (by device) of an index over all of them, a WAL page per delivery per commit.
DROP INDEX deliveries_device_idx;
CREATE INDEX deliveries_device_pending_idx ON deliveries (device_id) WHERE status = 'pending';
