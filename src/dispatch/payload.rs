//! Turning an update into the push each provider expects (API.md "Mobile push").

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::providers::apns::{self, ApnsRequest, PayloadContent, PayloadSpec};
use crate::providers::fcm::{FcmNotification, FcmRequest};
use crate::updates::Update;

/// APNs and FCM both refuse payloads over 4 KiB.
pub const MAX_PAYLOAD: usize = 4096;

/// The keys every push carries so the app can sync.
fn essentials(update: &Update) -> Map<String, Value> {
    let mut data = Map::new();
    if let Some(id) = update.tracking_id {
        data.insert("trackingId".into(), json!(id.to_string()));
    }
    data.insert("seq".into(), json!(update.seq));
    data.insert("type".into(), json!(update.kind));
    data
}

/// Essentials plus status and the update's data, as the app would like them.
fn full(update: &Update) -> Map<String, Value> {
    let mut data = essentials(update);
    if let Some(status) = &update.status {
        data.insert("status".into(), json!(status));
    }
    if let Some(extra) = &update.data {
        data.insert("data".into(), extra.clone());
    }
    data
}

/// The alert text, when the update carries a notification worth showing.
fn alert(update: &Update) -> Option<(Option<&str>, &str)> {
    let n = update.notification.as_ref()?;
    match (n.title.as_deref(), n.body.as_deref()) {
        (None, None) => None,
        (title, body) => Some((title, body.unwrap_or(""))),
    }
}

/// The APNs request for `update` to `token`; `expires` becomes `apns-expiration`.
pub fn apns_request(
    update: &Update,
    token: &str,
    environment: apns::Environment,
    expires: DateTime<Utc>,
) -> Result<ApnsRequest, apns::PayloadError> {
    let content = match alert(update) {
        Some((title, body)) => PayloadContent::Alert { title, body },
        None => PayloadContent::Background,
    };
    let thread = update.tracking_id.map(|id| id.to_string());
    let build = |data: &Map<String, Value>| {
        apns::build_payload(&PayloadSpec {
            content,
            thread_id: thread.as_deref(),
            data: Some(data),
        })
    };
    let mut payload = build(&full(update))?;
    if payload.len() > MAX_PAYLOAD {
        // Too big for APNs: the three keys are enough for the app to sync the rest.
        payload = build(&essentials(update))?;
    }
    Ok(ApnsRequest {
        device_token: token.to_string(),
        environment,
        push_type: content.push_type(),
        priority: content.priority(),
        expiration: Some(expires.timestamp()),
        collapse_id: thread,
        apns_id: None,
        topic: None,
        payload,
    })
}

/// FCM `data` values must be strings.
fn stringify(data: Map<String, Value>) -> BTreeMap<String, String> {
    data.into_iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect()
}

/// FCM counts data keys and values plus the notification text against its 4 KiB limit.
fn fcm_size(data: &BTreeMap<String, String>, notification: Option<&FcmNotification>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + notification.map_or(0, |n| n.title.len() + n.body.len())
}

/// The FCM request for `update` to `token`; `ttl` is what is left of the update's life.
pub fn fcm_request(update: &Update, token: &str, ttl: Duration) -> FcmRequest {
    let notification = alert(update).map(|(title, body)| FcmNotification {
        title: title.unwrap_or("").to_string(),
        body: body.to_string(),
    });
    let mut data = stringify(full(update));
    if fcm_size(&data, notification.as_ref()) > MAX_PAYLOAD {
        data = stringify(essentials(update));
    }
    FcmRequest {
        device_token: token.to_string(),
        high_priority: notification.is_some(),
        notification,
        data,
        ttl: Some(ttl),
        collapse_key: update.tracking_id.map(|id| id.to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Notification;
    use uuid::Uuid;

    fn update(notification: Option<Notification>, data: Value) -> Update {
        Update {
            seq: 42,
            id: Uuid::now_v7(),
            kind: "job.completed".into(),
            tracking_id: Some(Uuid::now_v7()),
            status: Some("completed".into()),
            data: Some(data),
            notification,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn alert_when_notified_background_otherwise() {
        let n = Notification {
            title: Some("Done".into()),
            body: Some("Your report".into()),
        };
        let u = update(Some(n), json!({"result": 1}));
        let req = apns_request(&u, "ab", apns::Environment::Production, Utc::now()).unwrap();
        assert_eq!(req.push_type, apns::PushType::Alert);
        assert_eq!(req.priority, 10);
        let body: Value = serde_json::from_slice(&req.payload).unwrap();
        assert_eq!(body["aps"]["alert"]["title"], "Done");
        assert_eq!(body["aps"]["thread-id"], u.tracking_id.unwrap().to_string());
        assert_eq!(body["seq"], 42);
        assert_eq!(body["data"]["result"], 1);
        assert_eq!(req.collapse_id, Some(u.tracking_id.unwrap().to_string()));

        let silent = update(None, json!({}));
        let req = apns_request(&silent, "ab", apns::Environment::Sandbox, Utc::now()).unwrap();
        assert_eq!(req.push_type, apns::PushType::Background);
        assert_eq!(req.priority, 5);
        let body: Value = serde_json::from_slice(&req.payload).unwrap();
        assert_eq!(body["aps"]["content-available"], 1);

        let fcm = fcm_request(&silent, "t", Duration::from_secs(60));
        assert!(fcm.notification.is_none() && !fcm.high_priority);
        assert_eq!(fcm.data["seq"], "42");
        assert_eq!(fcm.data["type"], "job.completed");
        assert_eq!(
            fcm.collapse_key,
            Some(silent.tracking_id.unwrap().to_string())
        );
    }

    #[test]
    fn oversized_payloads_shrink_to_the_three_keys() {
        let big = update(None, json!({"blob": "x".repeat(5000)}));
        let req = apns_request(&big, "ab", apns::Environment::Production, Utc::now()).unwrap();
        assert!(req.payload.len() <= MAX_PAYLOAD);
        let body: Value = serde_json::from_slice(&req.payload).unwrap();
        let keys: Vec<&String> = body
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "aps")
            .collect();
        assert_eq!(keys.len(), 3, "{body}");
        let fcm = fcm_request(&big, "t", Duration::from_secs(60));
        assert_eq!(
            fcm.data.keys().cloned().collect::<Vec<_>>(),
            ["seq", "trackingId", "type"]
        );
    }
}
