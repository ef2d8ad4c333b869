//! Builds the `messages:send` body from an [`FcmRequest`] with fcm_v1's message types.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fcm_v1::android::{AndroidConfig, AndroidMessagePriority};
use fcm_v1::apns::ApnsConfig;
use fcm_v1::message::{Message, Notification};
use serde::Serialize;
use serde_json::{Value, json};

use super::FcmRequest;

/// FCM's longest TTL (4 weeks); longer values are clamped to it, not refused, because "keep it
/// as long as you can" is what a longer TTL means.
pub const MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);
/// APNs refuses longer `apns-collapse-id` values.
const MAX_APNS_COLLAPSE_ID: usize = 64;

#[derive(Serialize)]
struct SendBody<'a> {
    validate_only: bool,
    message: &'a Message,
}

/// Why FCM would refuse `key` as a `data` key, if it would (reserved words).
pub fn reserved_data_key(key: &str) -> Option<&'static str> {
    if key == "from" || key == "message_type" {
        Some("is reserved")
    } else if key.starts_with("google") || key.starts_with("gcm") {
        Some("has a reserved prefix (google, gcm)")
    } else {
        None
    }
}

/// `"3600s"`, `"1.5s"`: the protobuf Duration JSON form FCM expects for `android.ttl`.
pub fn ttl_string(ttl: Duration) -> String {
    let ttl = ttl.min(MAX_TTL);
    let nanos = ttl.subsec_nanos();
    if nanos == 0 {
        format!("{}s", ttl.as_secs())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", ttl.as_secs(), frac.trim_end_matches('0'))
    }
}

/// The fcm_v1 message for `req`, or why it can never be sent (a Permanent reason). Taken by
/// value: its strings move into the message instead of being copied (the copies and the
/// request's drop were about 1% of the pipeline bench's CPU).
pub fn build_message(req: FcmRequest, now: SystemTime) -> Result<Message, String> {
    if req.device_token.trim().is_empty() {
        return Err("empty device token".into());
    }
    if let Some((key, why)) = req
        .data
        .keys()
        .find_map(|k| reserved_data_key(k).map(|why| (k, why)))
    {
        return Err(format!("data key {key:?} {why}"));
    }

    // Derived from the request before its fields move out.
    let apns = apns_config(&req, now);
    let notification = req.notification.map(|n| Notification {
        title: Some(n.title),
        body: Some(n.body),
        image: None,
    });
    // string → string by construction: every value is a JSON string.
    let data = (!req.data.is_empty()).then(|| {
        req.data
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect::<HashMap<_, _>>()
    });
    let android = AndroidConfig {
        collapse_key: req.collapse_key,
        priority: Some(if req.high_priority {
            AndroidMessagePriority::High
        } else {
            AndroidMessagePriority::Normal
        }),
        ttl: req.ttl.map(ttl_string),
        ..Default::default()
    };

    Ok(Message {
        token: Some(req.device_token),
        notification,
        data,
        android: Some(android),
        apns: Some(apns),
        ..Default::default()
    })
}

/// APNs headers derived from the same fields as Android's, then the caller's overrides.
fn apns_config(req: &FcmRequest, now: SystemTime) -> ApnsConfig {
    let alert = req.notification.is_some();
    let mut headers: HashMap<String, Value> = HashMap::new();
    let mut put = |k: &str, v: String| {
        headers.insert(k.to_owned(), Value::String(v));
    };
    // APNs requires priority 5 for background (data-only) pushes; 10 wakes the device now.
    put(
        "apns-push-type",
        if alert { "alert" } else { "background" }.into(),
    );
    put(
        "apns-priority",
        if alert && req.high_priority {
            "10"
        } else {
            "5"
        }
        .into(),
    );
    if let Some(ttl) = req.ttl {
        // apns-expiration is an absolute UNIX time; 0 means "deliver now or never".
        let value = if ttl.is_zero() {
            0
        } else {
            let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            (now + ttl.min(MAX_TTL)).as_secs()
        };
        put("apns-expiration", value.to_string());
    }
    if let Some(key) = &req.collapse_key {
        // Longer keys still collapse on Android; on iOS APNs would refuse the whole push.
        if key.len() <= MAX_APNS_COLLAPSE_ID {
            put("apns-collapse-id", key.clone());
        }
    }
    for (k, v) in &req.apns_headers {
        put(k, v.clone());
    }
    // A data-only push reaches an iOS app only as a background (content-available) push.
    let payload =
        (!alert).then(|| HashMap::from([("aps".to_owned(), json!({"content-available": 1}))]));
    ApnsConfig {
        headers: Some(headers),
        payload,
        fcm_options: None,
    }
}

/// The serialized `{"validate_only": …, "message": …}` request body.
pub fn request_body(message: &Message, validate_only: bool) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&SendBody {
        validate_only,
        message,
    })
    .map_err(|e| format!("cannot serialize message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::fcm::FcmNotification;
    use std::collections::BTreeMap;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn req() -> FcmRequest {
        FcmRequest {
            device_token: "tok-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn ttl_formats() {
        assert_eq!(ttl_string(Duration::from_secs(3600)), "3600s");
        assert_eq!(ttl_string(Duration::from_millis(1500)), "1.5s");
        assert_eq!(ttl_string(Duration::from_nanos(1)), "0.000000001s");
        assert_eq!(ttl_string(Duration::ZERO), "0s");
        assert_eq!(
            ttl_string(Duration::from_secs(10 * MAX_TTL.as_secs())),
            "2419200s"
        );
    }

    #[test]
    fn reserved_keys_are_refused() {
        for key in [
            "from",
            "message_type",
            "google.c.a",
            "googleX",
            "gcm",
            "gcm.notification",
        ] {
            let mut r = req();
            r.data.insert(key.into(), "v".into());
            let err = build_message(r, at(0)).unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        let mut r = req();
        r.data = BTreeMap::from([
            ("fromage".into(), "ok".into()),
            ("Google".into(), "ok".into()),
        ]);
        assert!(build_message(r, at(0)).is_ok());
    }

    #[test]
    fn empty_token_is_refused() {
        let r = FcmRequest::default();
        assert_eq!(build_message(r, at(0)).unwrap_err(), "empty device token");
    }

    #[test]
    fn full_message_shape() {
        let r = FcmRequest {
            device_token: "tok-1".into(),
            notification: Some(FcmNotification {
                title: "Done".into(),
                body: "Your export is ready".into(),
            }),
            data: BTreeMap::from([("job".into(), "42".into())]),
            high_priority: true,
            ttl: Some(Duration::from_secs(600)),
            collapse_key: Some("job-42".into()),
            apns_headers: BTreeMap::from([("apns-topic".into(), "com.example.app".into())]),
            validate_only: true,
        };
        let m = build_message(r, at(1_000)).unwrap();
        let v: Value = serde_json::from_slice(&request_body(&m, true).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "validate_only": true,
                "message": {
                    "token": "tok-1",
                    "notification": {"title": "Done", "body": "Your export is ready"},
                    "data": {"job": "42"},
                    "android": {"priority": "HIGH", "ttl": "600s", "collapse_key": "job-42"},
                    "apns": {"headers": {
                        "apns-push-type": "alert",
                        "apns-priority": "10",
                        "apns-expiration": "1600",
                        "apns-collapse-id": "job-42",
                        "apns-topic": "com.example.app",
                    }},
                }
            })
        );
    }

    #[test]
    fn data_only_is_a_background_push() {
        let mut r = req();
        r.high_priority = true;
        r.ttl = Some(Duration::ZERO);
        r.collapse_key = Some("k".repeat(65));
        let m = build_message(r, at(1_000)).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["android"]["priority"], "HIGH");
        assert_eq!(v["android"]["ttl"], "0s");
        let h = &v["apns"]["headers"];
        assert_eq!(h["apns-push-type"], "background");
        assert_eq!(h["apns-priority"], "5");
        assert_eq!(h["apns-expiration"], "0");
        assert!(h.get("apns-collapse-id").is_none());
        assert_eq!(v["apns"]["payload"]["aps"]["content-available"], 1);
        assert!(v.get("data").is_none());
        assert!(v.get("notification").is_none());
    }

    #[test]
    fn caller_apns_headers_override_derived_ones() {
        let mut r = req();
        r.apns_headers = BTreeMap::from([("apns-priority".into(), "1".into())]);
        let v = serde_json::to_value(build_message(r, at(0)).unwrap()).unwrap();
        assert_eq!(v["apns"]["headers"]["apns-priority"], "1");
        assert_eq!(v["android"]["priority"], "NORMAL");
    }
}
