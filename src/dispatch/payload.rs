//! Turning an update into the push each provider expects (API.md "Mobile push").

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::providers::apns::{self, ApnsRequest, PayloadContent};
use crate::providers::fcm::{FcmNotification, FcmRequest};
use crate::updates::Update;

/// APNs and FCM both refuse payloads over 4 KiB.
pub const MAX_PAYLOAD: usize = 4096;

/// The data keys of a push, borrowed from the update and serialised straight into the body
/// (no map of cloned values per push): the three the app syncs by, and unless shrunk to
/// those, the update's status and data.
#[derive(Debug, Serialize)]
struct PushData<'a> {
    #[serde(rename = "trackingId", skip_serializing_if = "Option::is_none")]
    tracking_id: Option<Uuid>,
    seq: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

impl<'a> PushData<'a> {
    /// Status and data as well, as the app would like them.
    fn full(update: &'a Update) -> Self {
        Self {
            status: update.status.as_deref(),
            data: update.data.as_ref(),
            ..Self::essentials(update)
        }
    }

    /// Only the keys every push carries so the app can sync.
    fn essentials(update: &'a Update) -> Self {
        Self {
            tracking_id: update.tracking_id,
            seq: update.seq,
            kind: &update.kind,
            status: None,
            data: None,
        }
    }

    /// FCM `data` values must be strings: JSON values other than strings are written as JSON.
    fn into_strings(self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(id) = self.tracking_id {
            out.insert("trackingId".to_string(), id.to_string());
        }
        out.insert("seq".to_string(), self.seq.to_string());
        out.insert("type".to_string(), self.kind.to_string());
        if let Some(status) = self.status {
            out.insert("status".to_string(), status.to_string());
        }
        if let Some(data) = self.data {
            let data = match data {
                Value::String(s) => s.clone(),
                // Straight into a buffer rather than through `Display`'s formatter (measured:
                // 0.8% of the pipeline's CPU). A `Value` always serializes; the empty string
                // is only there for the type.
                other => serde_json::to_string(other).unwrap_or_default(),
            };
            out.insert("data".to_string(), data);
        }
        out
    }
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
    let build = |data: &PushData<'_>| apns::build_payload_with(content, thread.as_deref(), data);
    let mut payload = build(&PushData::full(update))?;
    if payload.len() > MAX_PAYLOAD {
        // Too big for APNs: the three keys are enough for the app to sync the rest.
        payload = build(&PushData::essentials(update))?;
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
    let mut data = PushData::full(update).into_strings();
    if fcm_size(&data, notification.as_ref()) > MAX_PAYLOAD {
        data = PushData::essentials(update).into_strings();
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
    use serde_json::json;

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
        assert_eq!(body["trackingId"], u.tracking_id.unwrap().to_string());
        assert_eq!(body["type"], "job.completed");
        assert_eq!(body["status"], "completed");
        // FCM data values are strings: JSON ones are written as JSON, strings as themselves.
        let fcm = fcm_request(&u, "t", Duration::from_secs(60));
        assert_eq!(fcm.data["data"], r#"{"result":1}"#);
        assert_eq!(fcm.data["status"], "completed");
        assert_eq!(fcm.data["trackingId"], u.tracking_id.unwrap().to_string());
        let text = update(None, json!("plain"));
        assert_eq!(
            fcm_request(&text, "t", Duration::from_secs(60)).data["data"],
            "plain"
        );

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
