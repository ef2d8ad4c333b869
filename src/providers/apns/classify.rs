//! Maps every APNs answer to a [`PushOutcome`] plus what the sender itself must do about it
//! (renew the token, replace the connection), per the table in PROTOCOLS.md.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::providers::PushOutcome;

/// Declares the reason enum and its parsing from one list, so the two cannot drift apart.
macro_rules! reasons {
    ($($name:ident),* $(,)?) => {
        /// An APNs error `reason`, with an arm for reasons Apple adds later.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[allow(missing_docs)] // The variants are Apple's reason strings verbatim.
        pub enum ApnsReason {
            $($name,)*
            /// A reason this code does not know; classified by status alone.
            Unknown(String),
        }

        impl ApnsReason {
            /// Parses Apple's reason string; unknown ones are kept verbatim.
            pub fn parse(s: &str) -> Self {
                match s {
                    $(stringify!($name) => Self::$name,)*
                    other => Self::Unknown(other.to_owned()),
                }
            }

            /// Apple's spelling of this reason.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$name => stringify!($name),)*
                    Self::Unknown(s) => s,
                }
            }
        }
    };
}

reasons!(
    BadCollapseId,
    BadDeviceToken,
    BadExpirationDate,
    BadMessageId,
    BadPriority,
    BadTopic,
    DeviceTokenNotForTopic,
    DuplicateHeaders,
    IdleTimeout,
    InvalidPushType,
    MissingDeviceToken,
    MissingTopic,
    PayloadEmpty,
    TopicDisallowed,
    BadCertificate,
    BadCertificateEnvironment,
    ExpiredProviderToken,
    Forbidden,
    InvalidProviderToken,
    MissingProviderToken,
    UnrelatedKeyIdInToken,
    BadEnvironmentKeyIdInToken,
    BadPath,
    MethodNotAllowed,
    ExpiredToken,
    Unregistered,
    PayloadTooLarge,
    TooManyProviderTokenUpdates,
    TooManyRequests,
    InternalServerError,
    ServiceUnavailable,
    Shutdown,
);

impl fmt::Display for ApnsReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the sender does besides reporting the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing: the outcome is final.
    None,
    /// The token expired: renew it (if the 20-minute rule allows) and retry once.
    RenewToken,
    /// Replace the connection for later sends (503, Shutdown, IdleTimeout).
    Reconnect,
    /// Replace the connection and retry once (UnrelatedKeyIdInToken).
    ReconnectAndRetry,
}

/// The outcome of one answer plus the sender's follow-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What the dispatcher is told if no follow-up changes it.
    pub outcome: PushOutcome,
    /// Follow-up for the sender.
    pub action: Action,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: Option<String>,
    timestamp: Option<i64>,
}

/// `Retry-After`: delay-seconds or an HTTP-date.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((when - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// Classifies one APNs HTTP answer.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    if status == StatusCode::OK {
        let provider_id = headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return done(PushOutcome::Delivered { provider_id });
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (reason, timestamp) = match parsed {
        Some(b) => (b.reason.map(|r| ApnsReason::parse(&r)), b.timestamp),
        None => (None, None),
    };
    classify_reason(status, reason, timestamp, parse_retry_after(headers))
}

fn done(outcome: PushOutcome) -> Verdict {
    Verdict {
        outcome,
        action: Action::None,
    }
}

fn retry(reason: String, retry_after: Option<Duration>, action: Action) -> Verdict {
    Verdict {
        outcome: PushOutcome::Retry {
            retry_after,
            reason,
        },
        action,
    }
}

/// Classifies a non-200 answer from its parts (status, parsed reason, 410 timestamp in ms).
pub fn classify_reason(
    status: StatusCode,
    reason: Option<ApnsReason>,
    timestamp_ms: Option<i64>,
    retry_after: Option<Duration>,
) -> Verdict {
    use ApnsReason as R;
    let text = match &reason {
        Some(r) => r.as_str().to_owned(),
        None => format!("HTTP {}", status.as_u16()),
    };
    let invalid = |since| {
        done(PushOutcome::InvalidToken {
            reason: text.clone(),
            since,
        })
    };
    let permanent = || {
        done(PushOutcome::Permanent {
            reason: text.clone(),
        })
    };
    let misconfigured = || {
        done(PushOutcome::Misconfigured {
            reason: text.clone(),
        })
    };
    match reason {
        Some(R::BadDeviceToken | R::DeviceTokenNotForTopic) => invalid(None),
        Some(R::Unregistered | R::ExpiredToken) => {
            invalid(timestamp_ms.and_then(DateTime::from_timestamp_millis))
        }
        Some(
            R::BadCollapseId
            | R::BadExpirationDate
            | R::BadMessageId
            | R::BadPriority
            | R::BadTopic
            | R::DuplicateHeaders
            | R::InvalidPushType
            | R::MissingDeviceToken
            | R::MissingTopic
            | R::PayloadEmpty
            | R::TopicDisallowed
            | R::PayloadTooLarge
            | R::BadPath
            | R::MethodNotAllowed,
        ) => permanent(),
        Some(R::ExpiredProviderToken) => retry(text, retry_after, Action::RenewToken),
        Some(
            R::InvalidProviderToken
            | R::MissingProviderToken
            | R::BadCertificate
            | R::BadCertificateEnvironment
            | R::BadEnvironmentKeyIdInToken
            | R::Forbidden,
        ) => misconfigured(),
        Some(R::UnrelatedKeyIdInToken) => retry(text, retry_after, Action::ReconnectAndRetry),
        Some(R::TooManyProviderTokenUpdates) => {
            // Only a token-churn bug gets here: say so loudly, then back off like any 429.
            tracing::warn!("APNs answered TooManyProviderTokenUpdates");
            retry(text, retry_after, Action::None)
        }
        Some(R::TooManyRequests | R::InternalServerError) => retry(text, retry_after, Action::None),
        Some(R::ServiceUnavailable | R::Shutdown | R::IdleTimeout) => {
            retry(text, retry_after, Action::Reconnect)
        }
        // No or unknown reason: decide on the status alone.
        Some(R::Unknown(_)) | None => match status.as_u16() {
            410 => invalid(timestamp_ms.and_then(DateTime::from_timestamp_millis)),
            400 | 404 | 405 | 413 => permanent(),
            403 => misconfigured(),
            429 | 500 => retry(text, retry_after, Action::None),
            502..=599 => retry(text, retry_after, Action::Reconnect),
            // Not an APNs answer at all (e.g. a proxy or a wrong base URL): hold, never drop.
            _ => misconfigured(),
        },
    }
}

/// A transport failure: always retry later; the message may or may not have been delivered.
pub fn classify_transport(error: &str) -> PushOutcome {
    PushOutcome::Retry {
        retry_after: None,
        reason: error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str, retry_after: Option<&str>) -> Verdict {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        }
        classify(
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    fn reason_body(r: &str) -> String {
        format!(r#"{{"reason":"{r}"}}"#)
    }

    fn is_permanent(v: &Verdict, r: &str) -> bool {
        v.action == Action::None && v.outcome == PushOutcome::Permanent { reason: r.into() }
    }

    #[test]
    fn ok_is_delivered_with_apns_id() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "apns-id",
            "0a1b2c3d-0000-4000-8000-000000000001".parse().unwrap(),
        );
        let v = classify(StatusCode::OK, &headers, b"");
        assert_eq!(
            v,
            done(PushOutcome::Delivered {
                provider_id: Some("0a1b2c3d-0000-4000-8000-000000000001".into())
            })
        );
    }

    #[test]
    fn row_400_bad_device_token_and_not_for_topic_prune() {
        for r in ["BadDeviceToken", "DeviceTokenNotForTopic"] {
            let v = answer(400, &reason_body(r), None);
            assert_eq!(
                v,
                done(PushOutcome::InvalidToken {
                    reason: r.into(),
                    since: None
                })
            );
        }
    }

    #[test]
    fn row_410_unregistered_with_timestamp_and_expired_token() {
        let v = answer(
            410,
            r#"{"reason":"Unregistered","timestamp":1700000000123}"#,
            None,
        );
        let since = DateTime::from_timestamp_millis(1_700_000_000_123);
        assert_eq!(
            v,
            done(PushOutcome::InvalidToken {
                reason: "Unregistered".into(),
                since
            })
        );
        let v = answer(410, &reason_body("ExpiredToken"), None);
        assert_eq!(
            v,
            done(PushOutcome::InvalidToken {
                reason: "ExpiredToken".into(),
                since: None
            })
        );
    }

    #[test]
    fn row_400_message_errors_are_permanent() {
        for r in [
            "BadCollapseId",
            "BadExpirationDate",
            "BadMessageId",
            "BadPriority",
            "BadTopic",
            "DuplicateHeaders",
            "InvalidPushType",
            "MissingDeviceToken",
            "MissingTopic",
            "PayloadEmpty",
            "TopicDisallowed",
        ] {
            assert!(is_permanent(&answer(400, &reason_body(r), None), r), "{r}");
        }
    }

    #[test]
    fn row_413_payload_too_large_is_permanent() {
        let v = answer(413, &reason_body("PayloadTooLarge"), None);
        assert!(is_permanent(&v, "PayloadTooLarge"));
    }

    #[test]
    fn row_403_expired_provider_token_renews() {
        let v = answer(403, &reason_body("ExpiredProviderToken"), None);
        assert_eq!(v.action, Action::RenewToken);
        assert!(matches!(v.outcome, PushOutcome::Retry { .. }));
    }

    #[test]
    fn row_403_credentials_are_misconfigured() {
        for r in [
            "InvalidProviderToken",
            "MissingProviderToken",
            "BadCertificate",
            "BadCertificateEnvironment",
            "BadEnvironmentKeyIdInToken",
            "Forbidden",
        ] {
            let v = answer(403, &reason_body(r), None);
            assert_eq!(
                v,
                done(PushOutcome::Misconfigured { reason: r.into() }),
                "{r}"
            );
        }
    }

    #[test]
    fn row_403_unrelated_key_id_reconnects_and_retries() {
        let v = answer(403, &reason_body("UnrelatedKeyIdInToken"), None);
        assert_eq!(v.action, Action::ReconnectAndRetry);
        assert!(matches!(v.outcome, PushOutcome::Retry { .. }));
    }

    #[test]
    fn row_404_405_are_permanent_bugs() {
        assert!(is_permanent(
            &answer(404, &reason_body("BadPath"), None),
            "BadPath"
        ));
        let v = answer(405, &reason_body("MethodNotAllowed"), None);
        assert!(is_permanent(&v, "MethodNotAllowed"));
    }

    #[test]
    fn row_429_retries_with_retry_after() {
        for r in ["TooManyRequests", "TooManyProviderTokenUpdates"] {
            let v = answer(429, &reason_body(r), Some("7"));
            assert_eq!(
                v,
                retry(r.into(), Some(Duration::from_secs(7)), Action::None),
                "{r}"
            );
            let v = answer(429, &reason_body(r), None);
            assert_eq!(v, retry(r.into(), None, Action::None), "{r}");
        }
    }

    #[test]
    fn row_500_retries_on_same_connection() {
        let v = answer(500, &reason_body("InternalServerError"), None);
        assert_eq!(v, retry("InternalServerError".into(), None, Action::None));
    }

    #[test]
    fn row_503_retries_on_new_connection() {
        for r in ["ServiceUnavailable", "Shutdown"] {
            let v = answer(503, &reason_body(r), Some("3"));
            assert_eq!(
                v,
                retry(r.into(), Some(Duration::from_secs(3)), Action::Reconnect)
            );
        }
    }

    #[test]
    fn unknown_reasons_fall_back_on_status() {
        let unknown = |s| answer(s, &reason_body("SomethingNew"), None).outcome;
        assert_eq!(
            unknown(400),
            PushOutcome::Permanent {
                reason: "SomethingNew".into()
            }
        );
        assert_eq!(
            unknown(403),
            PushOutcome::Misconfigured {
                reason: "SomethingNew".into()
            }
        );
        assert!(matches!(unknown(410), PushOutcome::InvalidToken { .. }));
        assert!(matches!(unknown(429), PushOutcome::Retry { .. }));
        assert!(matches!(unknown(502), PushOutcome::Retry { .. }));
        assert!(matches!(unknown(302), PushOutcome::Misconfigured { .. }));
        assert_eq!(
            ApnsReason::parse("SomethingNew"),
            ApnsReason::Unknown("SomethingNew".into())
        );
    }

    #[test]
    fn missing_or_garbage_body_uses_status() {
        assert_eq!(
            answer(500, "<html>oops</html>", Some("2")),
            retry(
                "HTTP 500".into(),
                Some(Duration::from_secs(2)),
                Action::None
            )
        );
        assert_eq!(
            answer(403, "", None).outcome,
            PushOutcome::Misconfigured {
                reason: "HTTP 403".into()
            }
        );
    }

    #[test]
    fn reason_strings_round_trip() {
        for r in [
            "BadDeviceToken",
            "Shutdown",
            "UnrelatedKeyIdInToken",
            "IdleTimeout",
        ] {
            assert_eq!(ApnsReason::parse(r).as_str(), r);
            assert!(!matches!(ApnsReason::parse(r), ApnsReason::Unknown(_)));
        }
    }

    #[test]
    fn retry_after_http_date() {
        let mut headers = HeaderMap::new();
        let when = (Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        headers.insert(http::header::RETRY_AFTER, when.parse().unwrap());
        let got = parse_retry_after(&headers).unwrap();
        assert!(got > Duration::from_secs(100) && got <= Duration::from_secs(120));
    }

    #[test]
    fn transport_errors_retry() {
        assert_eq!(
            classify_transport("connection reset"),
            PushOutcome::Retry {
                retry_after: None,
                reason: "connection reset".into()
            }
        );
    }
}
