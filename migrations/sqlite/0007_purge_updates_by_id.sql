-- The retention purge finds old updates by id: ids are UUIDv7, whose leading 48 bits are the
-- millisecond the update was appended, so "appended before T" is a range of the primary key
-- (and of the deliveries' primary key, which leads with the update id). The index on
-- created_at it used took an entry per update appended, for a purge that runs a few times a day.
DROP INDEX updates_created_idx;
