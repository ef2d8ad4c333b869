//! Builds APNs JSON payloads with a2's types, adding what a2's `APS` lacks (`thread-id`).

use a2::request::notification::NotificationOptions;
use a2::request::notification::{DefaultNotificationBuilder, NotificationBuilder};
use a2::request::payload::{APS, PayloadLike};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::PushType;

/// What the notification shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadContent<'a> {
    /// A visible alert.
    Alert {
        /// Bold first line, if any.
        title: Option<&'a str>,
        /// The message text.
        body: &'a str,
    },
    /// A silent push waking the app (`content-available: 1`).
    Background,
}

impl PayloadContent<'_> {
    /// The `apns-push-type` this content needs.
    pub fn push_type(&self) -> PushType {
        match self {
            Self::Alert { .. } => PushType::Alert,
            Self::Background => PushType::Background,
        }
    }

    /// The `apns-priority` Apple expects: 10 for alerts, 5 (mandatory) for background pushes.
    pub fn priority(&self) -> u8 {
        match self {
            Self::Alert { .. } => 10,
            Self::Background => 5,
        }
    }
}

/// Everything that goes into one payload.
#[derive(Debug, Clone, Copy)]
pub struct PayloadSpec<'a> {
    /// Alert or background.
    pub content: PayloadContent<'a>,
    /// `aps.thread-id`: groups notifications on the device.
    pub thread_id: Option<&'a str>,
    /// Custom top-level keys for the app (must not contain `aps`).
    pub data: Option<&'a Map<String, Value>>,
}

/// Why a payload could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PayloadError {
    /// Custom data tried to set the reserved `aps` key.
    #[error("custom data must not use the reserved key \"aps\"")]
    ReservedKey,
    /// serde_json failed (should not happen for JSON values).
    #[error("cannot serialise APNs payload: {0}")]
    Serialize(String),
}

#[derive(Serialize, Debug)]
struct Aps<'a> {
    #[serde(flatten)]
    base: APS<'a>,
    #[serde(rename = "thread-id", skip_serializing_if = "Option::is_none")]
    thread_id: Option<&'a str>,
}

#[derive(Serialize, Debug)]
struct HeraldPayload<'a, D: Serialize> {
    aps: Aps<'a>,
    /// Borrowed: serialised in place rather than cloned per push.
    #[serde(flatten)]
    data: &'a D,
    #[serde(skip)]
    options: NotificationOptions<'a>,
}

impl<D: Serialize + std::fmt::Debug> PayloadLike for HeraldPayload<'_, D> {
    fn get_device_token(&self) -> &str {
        // The device token travels in the URL path, never in the payload.
        ""
    }

    fn get_options(&self) -> &NotificationOptions<'_> {
        &self.options
    }
}

/// Serialises `spec` to the JSON body of an APNs request.
pub fn build_payload(spec: &PayloadSpec<'_>) -> Result<Bytes, PayloadError> {
    let empty = Map::new();
    let data = spec.data.unwrap_or(&empty);
    if data.contains_key("aps") {
        return Err(PayloadError::ReservedKey);
    }
    build_payload_with(spec.content, spec.thread_id, data)
}

/// Serialises `content` and `thread_id` with the top-level keys of `data`, any type that
/// serialises as a map whose keys never include `aps` (nothing checks that here): a caller's
/// own struct is written straight into the body, with no map of values built per push.
pub fn build_payload_with<D: Serialize + std::fmt::Debug>(
    content: PayloadContent<'_>,
    thread_id: Option<&str>,
    data: &D,
) -> Result<Bytes, PayloadError> {
    let builder = DefaultNotificationBuilder::new();
    let builder = match content {
        PayloadContent::Alert { title, body } => {
            let b = builder.set_body(body);
            match title {
                Some(t) => b.set_title(t),
                None => b,
            }
        }
        PayloadContent::Background => builder.set_content_available(),
    };
    let mut aps = builder.build("", NotificationOptions::default()).aps;
    // a2 always writes `mutable-content: 0`, which means the same as leaving it out.
    if aps.mutable_content == Some(0) {
        aps.mutable_content = None;
    }
    let payload = HeraldPayload {
        aps: Aps {
            base: aps,
            thread_id,
        },
        data,
        options: NotificationOptions::default(),
    };
    payload
        .to_json_string()
        .map(Bytes::from)
        .map_err(|e| PayloadError::Serialize(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn alert_with_thread_and_data() {
        let data = json!({"jobId": "j1", "n": 3}).as_object().cloned().unwrap();
        let spec = PayloadSpec {
            content: PayloadContent::Alert {
                title: Some("Done"),
                body: "Your export is ready",
            },
            thread_id: Some("exports"),
            data: Some(&data),
        };
        assert_eq!(
            parse(&build_payload(&spec).unwrap()),
            json!({
                "aps": {"alert": {"title": "Done", "body": "Your export is ready"}, "thread-id": "exports"},
                "jobId": "j1", "n": 3
            })
        );
        assert_eq!(spec.content.push_type(), PushType::Alert);
        assert_eq!(spec.content.priority(), 10);
    }

    #[test]
    fn alert_without_title_is_plain_body() {
        let spec = PayloadSpec {
            content: PayloadContent::Alert {
                title: None,
                body: "hi",
            },
            thread_id: None,
            data: None,
        };
        assert_eq!(
            parse(&build_payload(&spec).unwrap()),
            json!({"aps": {"alert": "hi"}})
        );
    }

    #[test]
    fn background_is_content_available() {
        let spec = PayloadSpec {
            content: PayloadContent::Background,
            thread_id: None,
            data: None,
        };
        assert_eq!(
            parse(&build_payload(&spec).unwrap()),
            json!({"aps": {"content-available": 1}})
        );
        assert_eq!(spec.content.push_type(), PushType::Background);
        assert_eq!(spec.content.priority(), 5);
    }

    #[test]
    fn aps_key_in_data_is_refused() {
        let data = json!({"aps": {}}).as_object().cloned().unwrap();
        let spec = PayloadSpec {
            content: PayloadContent::Background,
            thread_id: None,
            data: Some(&data),
        };
        assert!(matches!(
            build_payload(&spec),
            Err(PayloadError::ReservedKey)
        ));
    }
}
