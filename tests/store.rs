//! Storage conformance: the same cases against SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{Engine, TestDb, apns_token};
use herald::devices::{ApnsEnvironment, DeviceStatus, NewDevice, Platform};
use herald::store::Store;

async fn open(engine: Engine) -> (TestDb, Arc<dyn Store>) {
    common::open_store(engine, 5).await
}

fn apns(n: u32) -> NewDevice {
    NewDevice {
        platform: Platform::Apns,
        token: apns_token(n),
        environment: Some(ApnsEnvironment::Sandbox),
        app_id: "com.example.app".into(),
        locale: Some("en-US".into()),
        app_version: Some("1.0".into()),
    }
}

async fn migrations_are_idempotent_and_ping_works(engine: Engine) {
    let (_db, store) = open(engine).await;
    store.migrate().await.expect("second migrate is a no-op");
    store.ping().await.expect("ping");
}

async fn upsert_creates_then_refreshes(engine: Engine) {
    let (_db, store) = open(engine).await;
    let first = store.upsert_device("alice", &apns(1)).await.unwrap();
    assert!(first.created);
    assert_eq!(first.device.status, DeviceStatus::Active);
    let mut changed = apns(1);
    changed.app_version = Some("2.0".into());
    changed.environment = Some(ApnsEnvironment::Production);
    let second = store.upsert_device("alice", &changed).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.device.id, first.device.id);
    assert_eq!(second.device.app_version.as_deref(), Some("2.0"));
    assert_eq!(second.device.environment, Some(ApnsEnvironment::Production));
    assert_eq!(second.device.created_at, first.device.created_at);
    assert!(second.device.last_seen_at >= first.device.last_seen_at);
    assert_eq!(store.list_devices("alice").await.unwrap().len(), 1);
}

async fn token_moves_between_users(engine: Engine) {
    let (_db, store) = open(engine).await;
    let alice = store.upsert_device("alice", &apns(2)).await.unwrap();
    let bob = store.upsert_device("bob", &apns(2)).await.unwrap();
    assert!(bob.created);
    assert_ne!(
        bob.device.id, alice.device.id,
        "a moved token is a new device for its new owner"
    );
    assert!(store.list_devices("alice").await.unwrap().is_empty());
    assert_eq!(store.list_devices("bob").await.unwrap().len(), 1);
}

async fn same_token_on_two_platforms_is_two_devices(engine: Engine) {
    let (_db, store) = open(engine).await;
    let mut fcm = apns(3);
    fcm.platform = Platform::Fcm;
    fcm.environment = None;
    store.upsert_device("alice", &apns(3)).await.unwrap();
    store.upsert_device("alice", &fcm).await.unwrap();
    assert_eq!(store.list_devices("alice").await.unwrap().len(), 2);
}

async fn invalidation_and_reactivation(engine: Engine) {
    let (_db, store) = open(engine).await;
    let dev = store.upsert_device("alice", &apns(4)).await.unwrap().device;
    // An APNs 410 stamped before the latest registration does not invalidate.
    let before = dev.registered_at - chrono::Duration::seconds(5);
    assert!(
        !store
            .invalidate_device(dev.id, "Unregistered", Some(before))
            .await
            .unwrap()
    );
    assert!(
        store
            .invalidate_device(dev.id, "Unregistered", Some(Utc::now()))
            .await
            .unwrap()
    );
    let listed = store.list_devices("alice").await.unwrap();
    assert_eq!(listed[0].status, DeviceStatus::Invalid);
    assert_eq!(listed[0].invalid_reason.as_deref(), Some("Unregistered"));
    let again = store.upsert_device("alice", &apns(4)).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.device.status, DeviceStatus::Active);
    assert_eq!(again.device.invalid_reason, None);
}

async fn delete_only_own_devices(engine: Engine) {
    let (_db, store) = open(engine).await;
    let dev = store.upsert_device("alice", &apns(5)).await.unwrap().device;
    assert!(!store.delete_device("bob", dev.id).await.unwrap());
    assert!(
        !store
            .delete_device("alice", uuid::Uuid::now_v7())
            .await
            .unwrap()
    );
    assert!(store.delete_device("alice", dev.id).await.unwrap());
    assert!(store.list_devices("alice").await.unwrap().is_empty());
}

async fn concurrent_registrations_of_one_token_make_one_device(engine: Engine) {
    let (_db, store) = open(engine).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.upsert_device("alice", &apns(6)).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        let result = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        created += usize::from(result.created);
    }
    assert_eq!(created, 1, "exactly one registration creates the device");
    assert_eq!(store.list_devices("alice").await.unwrap().len(), 1);
}

fn job(user: &str, n: i64, key: Option<&str>) -> herald::jobs::NewJob {
    herald::jobs::NewJob {
        user_id: user.into(),
        kind: format!("kind-{n}"),
        input: serde_json::json!({ "n": n }),
        callback_url: None,
        notify: None,
        idempotency_key: key.map(String::from),
        request_hash: format!("hash-{n}"),
        max_attempts: 3,
    }
}

async fn group_commit_keeps_order_and_idempotency(engine: Engine) {
    use herald::jobs::CreateOutcome;
    let (_db, store) = open(engine).await;
    // No keys: the engine may insert the batch in one statement; outcomes stay in input order.
    let batch: Vec<_> = (0..20)
        .map(|n| job(if n % 2 == 0 { "alice" } else { "bob" }, n, None))
        .collect();
    let outcomes = store.create_jobs(&batch).await.unwrap();
    assert_eq!(outcomes.len(), 20);
    for (n, outcome) in outcomes.iter().enumerate() {
        match outcome {
            CreateOutcome::Created(job) => assert_eq!(job.kind, format!("kind-{n}")),
            other => panic!("{other:?}"),
        }
    }
    // One key twice in a batch: the second is a replay of the first; another body is refused.
    let mut twin = job("alice", 100, Some("k"));
    twin.kind = "kind-100".into();
    let mut other = job("alice", 101, Some("k"));
    other.request_hash = "different".into();
    let outcomes = store
        .create_jobs(&[job("alice", 100, Some("k")), twin, other])
        .await
        .unwrap();
    let first = match &outcomes[0] {
        CreateOutcome::Created(job) => job.tracking_id,
        other => panic!("{other:?}"),
    };
    assert!(matches!(&outcomes[1], CreateOutcome::Replayed(job) if job.tracking_id == first));
    assert!(matches!(&outcomes[2], CreateOutcome::KeyReused));
    assert_eq!(
        store
            .list_jobs("alice", None, None, 100)
            .await
            .unwrap()
            .len(),
        11
    );
}

/// Outcomes recorded in one batch are each fenced by the attempt that was claimed: a late
/// answer from an attempt whose lease expired (and was claimed again) changes nothing.
async fn recorded_outcomes_are_fenced_by_attempt(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult};
    let (_db, store) = open(engine).await;
    let mut devices = Vec::new();
    for n in 0..3 {
        devices.push(
            store
                .upsert_device("alice", &apns(20 + n))
                .await
                .unwrap()
                .device
                .id,
        );
    }
    let update = herald::updates::NewUpdate {
        kind: "order.shipped".into(),
        tracking_id: None,
        status: None,
        data: None,
        notification: None,
    };
    store.publish_event("alice", &update).await.unwrap();
    // Attempt 1 with a lease that is already over, then attempt 2 for the same deliveries.
    let first = store.claim_deliveries(10, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 3);
    assert_eq!(store.expire_delivery_leases().await.unwrap(), 3);
    let second = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(second.iter().all(|d| d.attempt == 2));
    // Each outcome as the dispatcher builds it from its claim, where the claim left the row
    // (on PostgreSQL, the first claim's row versions are dead: the second claim rewrote them).
    let result = |device: uuid::Uuid, attempt: i32, outcome: DeliveryOutcome| {
        let claims = if attempt == 1 { &first } else { &second };
        let claim = claims.iter().find(|d| d.device_id == device).unwrap();
        DeliveryResult::of(claim, outcome)
    };
    let sent = || DeliveryOutcome::Sent {
        provider_id: Some("p".into()),
    };
    let failed = || DeliveryOutcome::Failed {
        reason: "late".into(),
    };
    store
        .record_deliveries(&[
            result(devices[0], 1, sent()),
            result(devices[1], 2, sent()),
            result(devices[1], 1, failed()),
            result(devices[2], 1, failed()),
            result(devices[2], 2, failed()),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        1,
        "device 0 still sending"
    );
    let pushed = |list: &[herald::devices::Device], id: uuid::Uuid| {
        list.iter()
            .find(|d| d.id == id)
            .unwrap()
            .last_push_at
            .is_some()
    };
    let list = store.list_devices("alice").await.unwrap();
    // The stale Sent leaves its row to the attempt that holds it, but the provider did accept
    // that push: lastPushAt says so.
    assert!(
        pushed(&list, devices[0]),
        "the provider accepted a push for device 0"
    );
    assert!(pushed(&list, devices[1]));
    assert!(
        !pushed(&list, devices[2]),
        "failures never touch lastPushAt"
    );
    // A batch of Sent alone (PostgreSQL's one-statement path) is fenced the same way.
    store
        .record_deliveries(&[result(devices[0], 1, sent())])
        .await
        .unwrap();
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        1,
        "stale Sent alone"
    );
    // Found by key when the outcome carries no row hint.
    store
        .record_deliveries(&[DeliveryResult {
            row: Default::default(),
            ..result(devices[0], 2, sent())
        }])
        .await
        .unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
    let list = store.list_devices("alice").await.unwrap();
    assert!(pushed(&list, devices[0]));
    // Nothing is claimable again: sent and failed are final.
    assert!(
        store
            .claim_deliveries(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A released delivery is due again at once, for any sender, at the attempt it had; a stale
/// release (an attempt that no longer holds the row) changes nothing.
async fn released_deliveries_are_due_again_without_spending_the_attempt(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult};
    let (_db, store) = open(engine).await;
    store.upsert_device("alice", &apns(30)).await.unwrap();
    store.publish_event("alice", &shipped()).await.unwrap();
    let lease = Duration::from_secs(60);
    let claimed = store.claim_deliveries(10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let first = &claimed[0];
    assert_eq!(first.attempt, 1);
    let until = chrono::Utc::now() + chrono::Duration::seconds(55);
    assert!(first.lease_until > until, "the claim's lease comes with it");
    let release = |attempt: i32| DeliveryResult {
        update_id: first.update.id,
        device_id: first.device_id,
        attempt,
        outcome: DeliveryOutcome::Released,
        row: Default::default(),
    };
    store.record_deliveries(&[release(2)]).await.unwrap();
    assert!(
        store.claim_deliveries(10, lease).await.unwrap().is_empty(),
        "a stale release leaves the claim alone"
    );
    store.record_deliveries(&[release(1)]).await.unwrap();
    let again = store.claim_deliveries(10, lease).await.unwrap();
    assert_eq!(again.len(), 1, "due again at once");
    assert_eq!(again[0].attempt, 1, "the attempt was not spent");
}

/// A Sent outcome rewrites a device's lastPushAt only when it is a second or more old: a burst
/// of pushes to one device writes its row once, and a push after a quiet second moves it on.
/// Both recording paths (a batch of Sent alone, PostgreSQL's one statement; a mixed batch).
async fn last_push_at_moves_at_most_once_a_second(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult};
    let (_db, store) = open(engine).await;
    let device = store
        .upsert_device("alice", &apns(40))
        .await
        .unwrap()
        .device
        .id;
    let update = shipped();
    for _ in 0..4 {
        store.publish_event("alice", &update).await.unwrap();
    }
    let claimed = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let result = |n: usize, outcome: DeliveryOutcome| DeliveryResult {
        update_id: claimed[n].update.id,
        device_id: device,
        attempt: claimed[n].attempt,
        outcome,
        row: Default::default(),
    };
    let sent = || DeliveryOutcome::Sent { provider_id: None };
    let last_push = || async {
        store.list_devices("alice").await.unwrap()[0]
            .last_push_at
            .expect("pushed")
    };
    store.record_deliveries(&[result(0, sent())]).await.unwrap();
    let first = last_push().await;
    store.record_deliveries(&[result(1, sent())]).await.unwrap();
    assert_eq!(last_push().await, first, "within the second: not rewritten");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let failed = DeliveryOutcome::Failed {
        reason: "late".into(),
    };
    store
        .record_deliveries(&[result(2, sent()), result(3, failed)])
        .await
        .unwrap();
    let later = last_push().await;
    assert!(
        later >= first + chrono::Duration::seconds(1),
        "a second on: {first} -> {later}"
    );
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
}

/// A batch of events for several users commits in one transaction: each user's seqs continue
/// where their log stood, in batch order, and every active device of each user gets a delivery.
async fn batched_appends_number_each_users_log_in_order(engine: Engine) {
    let (_db, store) = open(engine).await;
    for (user, n) in [("alice", 40), ("alice", 41), ("bob", 42)] {
        store.upsert_device(user, &apns(n)).await.unwrap();
    }
    let event = |k: u32| herald::updates::NewUpdate {
        kind: "order.shipped".into(),
        tracking_id: None,
        status: None,
        data: Some(serde_json::json!({ "k": k })),
        notification: None,
    };
    store.publish_event("bob", &event(0)).await.unwrap();
    let batch: Vec<(String, herald::updates::NewUpdate)> = [
        ("carol", 1),
        ("bob", 2),
        ("alice", 3),
        ("bob", 4),
        ("alice", 5),
    ]
    .into_iter()
    .map(|(user, k)| (user.to_string(), event(k)))
    .collect();
    let appended = store.publish_events(&batch).await.unwrap();
    let seqs: Vec<i64> = appended.iter().map(|u| u.seq).collect();
    assert_eq!(seqs, [1, 2, 1, 3, 2], "bob's log already had seq 1");
    for (user, ks) in [
        ("alice", vec![3u32, 5]),
        ("bob", vec![0, 2, 4]),
        ("carol", vec![1]),
    ] {
        let log = store.list_updates(user, 0, 10).await.unwrap();
        let got: Vec<u64> = log
            .iter()
            .map(|u| u.data.as_ref().unwrap()["k"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = ks.into_iter().map(u64::from).collect();
        assert_eq!(got, want, "{user}'s log in order");
        let seqs: Vec<i64> = log.iter().map(|u| u.seq).collect();
        assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>());
    }
    // alice: 2 updates x 2 devices; bob: 3 x 1; carol has no device.
    assert_eq!(store.pending_deliveries().await.unwrap(), 7);
    assert!(store.publish_events(&[]).await.unwrap().is_empty());
}

/// What an update carries comes back as it went in, whatever characters and numbers it holds
/// (SQLite's append passes the batch through JSON inside the query).
async fn appended_updates_keep_their_data_exactly(engine: Engine) {
    let (_db, store) = open(engine).await;
    store.upsert_device("alice", &apns(45)).await.unwrap();
    let data = serde_json::json!({
        "quote": "say \"hi\"\\ \n\t", "unicode": "Grüße 📦 \u{2028}", "empty": {},
        "nested": [1, -2.5, 1e300, 18446744073709551615u64, null, true, [], {"z": "a", "a": "z"}],
    });
    let notification = herald::jobs::Notification {
        title: Some("It's \"here\"".into()),
        body: Some("Ünïcödé ✓".into()),
    };
    let events = [
        herald::updates::NewUpdate {
            data: Some(data.clone()),
            notification: Some(notification.clone()),
            ..shipped()
        },
        shipped(),
    ];
    let batch: Vec<(String, herald::updates::NewUpdate)> = events
        .into_iter()
        .map(|e| ("alice".to_string(), e))
        .collect();
    store.publish_events(&batch).await.unwrap();
    let log = store.list_updates("alice", 0, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].data.as_ref(), Some(&data));
    assert_eq!(log[0].notification.as_ref(), Some(&notification));
    assert_eq!(log[1].data, None, "no data stays no data");
    assert_eq!(log[1].notification, None);
}

/// Deliveries appended with a handoff are written as claimed by the appending node and come
/// back to it; nobody else can claim them until the lease runs out, then they are due again
/// (a node that died holding them loses nothing).
async fn handed_off_deliveries_are_claimed_until_their_lease_ends(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult, Handoff, RowHint};
    let (_db, store) = open(engine).await;
    let phone = store
        .upsert_device("alice", &apns(50))
        .await
        .unwrap()
        .device
        .id;
    let tablet = store
        .upsert_device("alice", &apns(51))
        .await
        .unwrap()
        .device
        .id;
    let event = shipped();
    let handoff = Handoff {
        owner: "node-a".into(),
        until: Utc::now() - chrono::Duration::seconds(1),
    };
    let appended = store
        .append_events(&[("alice".to_string(), event)], Some(&handoff))
        .await
        .unwrap();
    assert_eq!(appended.updates.len(), 1);
    let mut devices: Vec<_> = appended.claimed.iter().map(|d| d.device_id).collect();
    devices.sort();
    let mut want = vec![phone, tablet];
    want.sort();
    assert_eq!(devices, want);
    assert!(appended.claimed.iter().all(|d| d.attempt == 1
        && d.update.id == appended.updates[0].id
        && d.token.len() == 64
        && d.lease_until == handoff.until));
    assert!(
        store
            .claim_deliveries(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "handed off: not claimable"
    );
    assert_eq!(store.pending_deliveries().await.unwrap(), 2);
    // The lease (already over here) runs out: due again, second attempt.
    assert_eq!(store.expire_delivery_leases().await.unwrap(), 2);
    let again = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|d| d.attempt == 2));
    // Outcomes as the dispatcher builds them, each finding its row where the append or the
    // claim left it (PostgreSQL's ctid): the lost first attempt's change nothing.
    let sent = |d: &herald::store::DueDelivery| {
        DeliveryResult::of(d, DeliveryOutcome::Sent { provider_id: None })
    };
    let sent_all =
        |claims: &[herald::store::DueDelivery]| claims.iter().map(sent).collect::<Vec<_>>();
    store
        .record_deliveries(&sent_all(&appended.claimed))
        .await
        .unwrap();
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        2,
        "stale attempts"
    );
    store.record_deliveries(&sent_all(&again)).await.unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
    let live = Handoff {
        owner: "node-a".into(),
        until: Utc::now() + chrono::Duration::seconds(60),
    };
    let fresh = store
        .append_events(&[("alice".to_string(), shipped())], Some(&live))
        .await
        .unwrap()
        .claimed;
    assert_eq!(fresh.len(), 2);
    if engine == Engine::Postgres {
        assert!(
            fresh
                .iter()
                .chain(&again)
                .all(|d| d.row != RowHint::default()),
            "appends and claims say where they left each row"
        );
    }
    store.record_deliveries(&sent_all(&fresh)).await.unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 0, "delivered");
}

/// Claims running side by side (two dispatchers, or two nodes on PostgreSQL) split the due
/// deliveries between them: each is claimed once, oldest update first within a claim, with
/// everything needed to send it.
async fn side_by_side_claims_take_each_delivery_once(engine: Engine) {
    let (_db, store) = open(engine).await;
    let device = store
        .upsert_device("alice", &apns(70))
        .await
        .unwrap()
        .device
        .id;
    let events: Vec<_> = (0..40).map(|_| ("alice".to_string(), shipped())).collect();
    let appended = store.append_events(&events, None).await.unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 40);
    let lease = Duration::from_secs(60);
    let (a, b) = tokio::join!(
        store.claim_deliveries(25, lease),
        store.claim_deliveries(25, lease)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    for claim in [&a, &b] {
        let seqs: Vec<i64> = claim.iter().map(|d| d.update.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert!(claim.iter().all(|d| d.device_id == device
            && d.attempt == 1
            && d.token == apns_token(70)
            && d.platform == Platform::Apns));
    }
    let mut ids: Vec<_> = a.iter().chain(&b).map(|d| d.update.id).collect();
    ids.sort();
    let mut want: Vec<_> = appended.updates.iter().map(|u| u.id).collect();
    want.sort();
    assert_eq!(ids, want, "every delivery claimed exactly once");
    assert!(store.claim_deliveries(25, lease).await.unwrap().is_empty());
}

fn shipped() -> herald::updates::NewUpdate {
    herald::updates::NewUpdate {
        kind: "order.shipped".into(),
        tracking_id: None,
        status: None,
        data: None,
        notification: None,
    }
}

/// A device's deliveries go with it, and old updates' deliveries go with them in the purge
/// (explicit deletes: PostgreSQL keeps no foreign keys on deliveries).
async fn deliveries_leave_with_their_device_and_their_update(engine: Engine) {
    let (_db, store) = open(engine).await;
    let phone = store
        .upsert_device("alice", &apns(60))
        .await
        .unwrap()
        .device
        .id;
    store.upsert_device("alice", &apns(61)).await.unwrap();
    store
        .append_events(&[("alice".to_string(), shipped())], None)
        .await
        .unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 2);
    assert!(!store.delete_device("mallory", phone).await.unwrap());
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        2,
        "another user's delete changes nothing"
    );
    assert!(store.delete_device("alice", phone).await.unwrap());
    assert_eq!(store.pending_deliveries().await.unwrap(), 1);
    let claimed = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_ne!(claimed[0].device_id, phone);
    // The purge takes the update and its remaining (in-flight) delivery.
    assert_eq!(
        store
            .purge(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
}

/// The device index holds only pending deliveries (migrations 0006/0007): in-flight ones are
/// still found when their device is deleted, and one that went back to pending after a retry is
/// still dropped when another push finds its device's token dead.
async fn open_deliveries_are_found_by_device_in_flight_or_pending(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult, Handoff};
    let (_db, store) = open(engine).await;
    let phone = store
        .upsert_device("alice", &apns(70))
        .await
        .unwrap()
        .device
        .id;
    let handoff = Handoff {
        owner: "node-a".into(),
        until: Utc::now() + chrono::Duration::seconds(60),
    };
    let in_flight = store
        .append_events(&[("alice".to_string(), shipped())], Some(&handoff))
        .await
        .unwrap()
        .claimed;
    assert_eq!(in_flight.len(), 1);
    assert_eq!(store.pending_deliveries().await.unwrap(), 1);
    assert!(store.delete_device("alice", phone).await.unwrap());
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        0,
        "the in-flight delivery left with its device"
    );

    let tablet = store
        .upsert_device("alice", &apns(71))
        .await
        .unwrap()
        .device
        .id;
    let claimed = store
        .append_events(
            &[
                ("alice".to_string(), shipped()),
                ("alice".to_string(), shipped()),
            ],
            Some(&handoff),
        )
        .await
        .unwrap()
        .claimed;
    assert_eq!(claimed.len(), 2);
    let result = |d: &herald::store::DueDelivery, outcome| DeliveryResult {
        update_id: d.update.id,
        device_id: tablet,
        attempt: d.attempt,
        outcome,
        row: Default::default(),
    };
    store
        .record_deliveries(&[result(
            &claimed[0],
            DeliveryOutcome::Retry {
                at: Utc::now() + chrono::Duration::seconds(600),
                reason: "503".into(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 2);
    store
        .record_deliveries(&[result(
            &claimed[1],
            DeliveryOutcome::InvalidToken {
                reason: "Unregistered".into(),
                since: None,
            },
        )])
        .await
        .unwrap();
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        0,
        "the retried delivery was dropped with its dead device"
    );
    let listed = store.list_devices("alice").await.unwrap();
    assert_eq!(listed[0].status, DeviceStatus::Invalid);
}

/// SQLite's WAL is folded into the database file by the store's own checkpointing connection,
/// not only by the writer once the WAL passes its threshold (far above what is written here),
/// and whatever is left when the store closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checkpoints_the_wal_in_the_background() {
    let (db, store) = open(Engine::Sqlite).await;
    let file = std::path::PathBuf::from(db.url.trim_start_matches("sqlite://"));
    let main_file = || std::fs::metadata(&file).unwrap().len();
    // Let the checkpoints of the migrations settle first.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = main_file();
    // A few hundred KiB of device rows: pages the main file has never held.
    for n in 0..400 {
        store.upsert_device("alice", &apns(1000 + n)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while main_file() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL was never checkpointed ({before} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.upsert_device("alice", &apns(2000)).await.unwrap();
    store.close().await;
    let wal = std::path::PathBuf::from(format!("{}-wal", file.display()));
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "closing leaves no WAL behind"
    );
}

/// A delivered push is kept with its provider id, fenced by its attempt, and goes with its update
/// in the purge. SQLite marks the outbox row sent; PostgreSQL moves it to `sent_deliveries`
/// (migration 0009), also when the batch holds other outcomes.
async fn delivered_pushes_keep_their_provider_id_until_the_purge(engine: Engine) {
    use herald::store::{DeliveryOutcome, DeliveryResult};
    let (db, store) = open(engine).await;
    let phone = store
        .upsert_device("alice", &apns(63))
        .await
        .unwrap()
        .device
        .id;
    let tablet = store
        .upsert_device("alice", &apns(64))
        .await
        .unwrap()
        .device
        .id;
    store
        .append_events(&[("alice".to_string(), shipped())], None)
        .await
        .unwrap();
    let claimed = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let result = |device: uuid::Uuid, attempt: i32, outcome: DeliveryOutcome| DeliveryResult {
        update_id: claimed[0].update.id,
        device_id: device,
        attempt,
        outcome,
        row: Default::default(),
    };
    let sent = |id: &str| DeliveryOutcome::Sent {
        provider_id: Some(id.into()),
    };
    store
        .record_deliveries(&[
            // A stale attempt's Sent changes nothing; the retry shares the batch.
            result(phone, 7, sent("stale")),
            result(phone, 1, sent("apns-id-1")),
            result(
                tablet,
                1,
                DeliveryOutcome::Retry {
                    at: Utc::now() + chrono::Duration::hours(1),
                    reason: "503".into(),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(store.pending_deliveries().await.unwrap(), 1, "the retry");
    let delivered = match engine {
        Engine::Sqlite => {
            "SELECT provider_id FROM deliveries WHERE status = 'sent' AND device_id = $1"
        }
        Engine::Postgres => "SELECT provider_id FROM sent_deliveries WHERE device_id = $1",
    };
    let provider_ids = |device: uuid::Uuid| {
        let url = db.url.clone();
        async move {
            match engine {
                Engine::Sqlite => {
                    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
                    let ids: Vec<Option<String>> = sqlx::query_scalar(delivered)
                        .bind(device)
                        .fetch_all(&raw)
                        .await
                        .unwrap();
                    raw.close().await;
                    ids
                }
                Engine::Postgres => {
                    let raw = sqlx::PgPool::connect(&url).await.unwrap();
                    let ids: Vec<Option<String>> = sqlx::query_scalar(delivered)
                        .bind(device)
                        .fetch_all(&raw)
                        .await
                        .unwrap();
                    raw.close().await;
                    ids
                }
            }
        }
    };
    assert_eq!(provider_ids(phone).await, [Some("apns-id-1".to_string())]);
    assert!(provider_ids(tablet).await.is_empty(), "not delivered yet");
    assert_eq!(
        store
            .purge(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert!(provider_ids(phone).await.is_empty(), "gone with its update");
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
}

/// A delivery left behind by a device deleted while its update was being appended (possible on
/// PostgreSQL, which keeps no foreign key to devices) is dropped by the claim, not leased again
/// and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claim_drops_deliveries_of_deleted_devices() {
    let (db, store) = open(Engine::Postgres).await;
    store.upsert_device("alice", &apns(62)).await.unwrap();
    store
        .append_events(&[("alice".to_string(), shipped())], None)
        .await
        .unwrap();
    let raw = sqlx::PgPool::connect(&db.url).await.unwrap();
    // What the append of a racing delete leaves: a delivery whose device row is gone.
    let orphans = sqlx::query(
        "INSERT INTO deliveries (update_id, device_id, user_id, status, attempts, next_attempt_at, \
         created_at, updated_at) SELECT update_id, $1, user_id, 'pending', 0, next_attempt_at, created_at, \
         updated_at FROM deliveries",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(&raw)
    .await
    .unwrap();
    assert_eq!(orphans.rows_affected(), 1);
    assert_eq!(store.pending_deliveries().await.unwrap(), 2);
    let claimed = store
        .claim_deliveries(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "only the delivery whose device exists");
    let dropped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE status = 'dropped' AND last_error = 'device deleted'",
    )
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(dropped, 1);
    assert_eq!(
        store.pending_deliveries().await.unwrap(),
        1,
        "the one in flight"
    );
    raw.close().await;
}

both_engines!(
    side_by_side_claims_take_each_delivery_once,
    deliveries_leave_with_their_device_and_their_update,
    open_deliveries_are_found_by_device_in_flight_or_pending,
    handed_off_deliveries_are_claimed_until_their_lease_ends,
    batched_appends_number_each_users_log_in_order,
    appended_updates_keep_their_data_exactly,
    group_commit_keeps_order_and_idempotency,
    migrations_are_idempotent_and_ping_works,
    upsert_creates_then_refreshes,
    token_moves_between_users,
    same_token_on_two_platforms_is_two_devices,
    invalidation_and_reactivation,
    delete_only_own_devices,
    concurrent_registrations_of_one_token_make_one_device,
    recorded_outcomes_are_fenced_by_attempt,
    released_deliveries_are_due_again_without_spending_the_attempt,
    last_push_at_moves_at_most_once_a_second,
    delivered_pushes_keep_their_provider_id_until_the_purge,
);
