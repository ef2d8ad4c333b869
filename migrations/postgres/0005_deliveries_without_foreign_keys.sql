-- The referential checks on every delivery insert (a locking lookup of the update and of the
-- device per row, run as triggers) were about a fifth of the server's CPU per push in the
-- pipeline benchmark. What the cascades did is now explicit: a device's deliveries are deleted
-- with it, the retention purge deletes old updates' deliveries first, and a claim drops a
-- delivery whose device was deleted while its update was being appended.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_update_id_fkey;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_device_id_fkey;
