-- As on SQLite (its 0006): only pending deliveries are indexed by device. Handed-off deliveries
-- are written as sending and leave as sent, so they no longer add an entry here when appended;
-- a device's in-flight deliveries are found through deliveries_sending_idx.
CREATE INDEX deliveries_device_pending_idx ON deliveries (device_id) WHERE status = 'pending';
DROP INDEX deliveries_device_open_idx;
