//! The retention purges' mechanics: which update ids are older than a moment, and deleting
//! rows below such an id in bounded batches.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreError;

/// The smallest UUIDv7 of the millisecond `at`: every update appended before `at` has a
/// smaller id (update ids are UUIDv7, made as the update is appended), every later one a
/// larger or equal id, in the byte order both engines compare ids in.
pub(super) fn first_id_at(at: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

/// Rows one purge statement deletes: small enough that the writer (SQLite has one) is held
/// for milliseconds, not for the whole backlog of a retention window.
pub(super) const PURGE_BATCH: i64 = 2_000;

/// Run `sql` (a delete of at most `$2` rows with an id below `$1`) until it deletes fewer than
/// a batch; each statement commits on its own. `rows` reads the engine's count of rows
/// affected. Returns the rows deleted.
pub(super) async fn delete_in_batches<'e, DB, E>(
    executor: E,
    sql: &'static str,
    bound: Uuid,
    rows: fn(&DB::QueryResult) -> u64,
) -> Result<u64, StoreError>
where
    DB: sqlx::Database,
    E: sqlx::Executor<'e, Database = DB> + Copy,
    Uuid: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let mut deleted = 0;
    loop {
        let done = sqlx::query::<DB>(sql)
            .bind(bound)
            .bind(PURGE_BATCH)
            .execute(executor)
            .await?;
        let n = rows(&done);
        deleted += n;
        if n < PURGE_BATCH as u64 {
            return Ok(deleted);
        }
        // Let the writes queued behind this one through before the next batch.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_id_at_splits_update_ids_at_the_millisecond() {
        let at = Utc::now();
        let before = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 0, 0));
        let bound = first_id_at(at);
        assert!(before < bound);
        let just_before = at - chrono::Duration::milliseconds(1);
        let earlier = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            just_before.timestamp() as u64,
            just_before.timestamp_subsec_nanos(),
        ));
        assert!(earlier < bound, "{earlier} < {bound}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = Uuid::now_v7();
        assert!(later >= bound, "{later} >= {bound}");
        assert_eq!(bound.get_version_num(), 7);
        // Byte order is what both engines compare: a blob on SQLite, uuid on PostgreSQL.
        assert!(earlier.as_bytes() < bound.as_bytes() && later.as_bytes() >= bound.as_bytes());
    }
}
