-- With no cascade from devices to deliveries left (0005), only open deliveries are ever looked
-- up by device (a device's deletion, a dead token dropping what was queued for it). Indexing
-- just those means a Sent outcome, a new tuple version of its row, no longer adds an entry here.
CREATE INDEX deliveries_device_open_idx ON deliveries (device_id) WHERE status IN ('pending', 'sending');
DROP INDEX deliveries_device_idx;
