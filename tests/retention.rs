//! Bounded storage, on both engines: a finished delivery's record leaves after the outcome
//! window while its update stays in the user's log, and the purges work in batches.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{Engine, TestDb, apns_token};
use herald::devices::{ApnsEnvironment, NewDevice, Platform};
use herald::store::{DeliveryOutcome, DeliveryResult, Store};
use herald::updates::NewUpdate;

async fn open(engine: Engine) -> (TestDb, Arc<dyn Store>) {
    common::open_store(engine, 5).await
}

fn phone(n: u32) -> NewDevice {
    NewDevice {
        platform: Platform::Apns,
        token: apns_token(n),
        environment: Some(ApnsEnvironment::Production),
        app_id: "com.example.app".into(),
        locale: None,
        app_version: None,
    }
}

fn event(n: usize) -> NewUpdate {
    NewUpdate {
        kind: "order.shipped".into(),
        tracking_id: None,
        status: None,
        data: Some(serde_json::json!({ "n": n })),
        notification: None,
    }
}

/// Records of finished deliveries, wherever the engine keeps them: SQLite keeps a delivered
/// push in the outbox marked sent, PostgreSQL moves it to `sent_deliveries` (migration 0009).
async fn finished_records(db: &TestDb) -> i64 {
    match db.engine {
        Engine::Sqlite => {
            let raw = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let n = sqlx::query_scalar(
                "SELECT count(*) FROM deliveries WHERE status IN ('sent', 'failed', 'dropped')",
            )
            .fetch_one(&raw)
            .await
            .unwrap();
            raw.close().await;
            n
        }
        Engine::Postgres => {
            let raw = sqlx::PgPool::connect(&db.url).await.unwrap();
            let n = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM sent_deliveries) + (SELECT count(*) FROM deliveries \
                 WHERE status IN ('sent', 'failed', 'dropped'))",
            )
            .fetch_one(&raw)
            .await
            .unwrap();
            raw.close().await;
            n
        }
    }
}

/// More finished deliveries than one purge statement deletes (so the batches loop), one
/// failed, one still pending: the outcome purge takes every finished record and nothing else.
async fn outcome_purge_keeps_updates_and_open_deliveries(engine: Engine) {
    const EVENTS: usize = 2_500;
    let (db, store) = open(engine).await;
    let device = store
        .upsert_device("alice", &phone(1))
        .await
        .unwrap()
        .device;
    let events: Vec<(String, NewUpdate)> = (0..EVENTS)
        .map(|n| ("alice".to_string(), event(n)))
        .collect();
    store.append_events(&events, None).await.unwrap();
    let mut results = Vec::new();
    loop {
        let claimed = store
            .claim_deliveries(1_000, Duration::from_secs(60))
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        for due in &claimed {
            let outcome = if due.update.seq == 1 {
                DeliveryOutcome::Failed {
                    reason: "PayloadTooLarge".into(),
                }
            } else if due.update.seq == 2 {
                DeliveryOutcome::Retry {
                    at: Utc::now() + chrono::Duration::hours(1),
                    reason: "503".into(),
                }
            } else {
                DeliveryOutcome::Sent {
                    provider_id: Some(format!("apns-{}", due.update.seq)),
                }
            };
            results.push(DeliveryResult::of(due, outcome));
        }
    }
    assert_eq!(results.len(), EVENTS);
    store.record_deliveries(&results).await.unwrap();
    assert_eq!(finished_records(&db).await, EVENTS as i64 - 1);
    assert_eq!(store.pending_deliveries().await.unwrap(), 1, "the retry");

    // Nothing is old enough yet.
    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_outcomes(an_hour_ago).await.unwrap(), 0);
    assert_eq!(finished_records(&db).await, EVENTS as i64 - 1);

    let purged = store
        .purge_outcomes(Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(
        purged,
        EVENTS as u64 - 1,
        "every finished record, in batches"
    );
    assert_eq!(finished_records(&db).await, 0);
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        1,
        "an open delivery is not an outcome"
    );
    // The log is untouched: every update is still there to sync, and acks still work.
    let log = store.list_updates("alice", 0, 5_000).await.unwrap();
    assert_eq!(log.len(), EVENTS);
    assert!(
        log.iter()
            .zip(1..)
            .all(|(update, seq)| update.seq == seq && update.data == event(seq as usize - 1).data)
    );
    store
        .ack_updates("alice", device.id, EVENTS as i64)
        .await
        .unwrap();
    // The retried delivery is still claimed and sent once due.
    store.close().await;
}

/// The update purge also works in batches: more updates than one statement deletes all go,
/// with their deliveries, and newer ones stay.
async fn update_purge_runs_in_batches(engine: Engine) {
    const OLD: usize = 4_500;
    let (_db, store) = open(engine).await;
    store.upsert_device("bob", &phone(2)).await.unwrap();
    let events: Vec<(String, NewUpdate)> =
        (0..OLD).map(|n| ("bob".to_string(), event(n))).collect();
    store.append_events(&events, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .append_events(&[("bob".to_string(), event(OLD))], None)
        .await
        .unwrap();
    assert_eq!(store.purge(cut).await.unwrap(), OLD as u64);
    let left = store.list_updates("bob", 0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, OLD as i64 + 1, "seq numbering is not reset");
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        1,
        "only the newer update's delivery is left"
    );
    store.close().await;
}

both_engines!(
    outcome_purge_keeps_updates_and_open_deliveries,
    update_purge_runs_in_batches,
);
