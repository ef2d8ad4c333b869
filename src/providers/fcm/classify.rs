//! Maps every FCM `messages:send` answer onto a [`PushOutcome`] (PROTOCOLS.md, FCM table).
//!
//! The FcmError `errorCode` decides when present; otherwise the HTTP status does, so an unknown
//! code or a non-JSON body (a proxy's HTML page) still lands in a sensible class.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::providers::PushOutcome;

/// FCM asks for backoff "starting at ≥ 60 s" on QUOTA_EXCEEDED without Retry-After.
pub const QUOTA_RETRY_FLOOR: Duration = Duration::from_secs(60);
/// FCM asks for backoff "starting at ≥ 10 s" on UNAVAILABLE / INTERNAL without Retry-After.
pub const UNAVAILABLE_RETRY_FLOOR: Duration = Duration::from_secs(10);
/// A Retry-After beyond this is treated as this: a typo on the server must not park work for years.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(24 * 3600);
/// Longest provider message kept in a reason string.
const MAX_MESSAGE: usize = 200;

/// INVALID_ARGUMENT with this message means the token itself is bad (prune), not the message.
const BAD_TOKEN_MESSAGE: &str = "registration token is not a valid fcm registration token";

/// What the sender does with one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Final: hand this to the dispatcher.
    Outcome(PushOutcome),
    /// 401 about our access token: refresh it once and resend.
    Unauthorized(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: RpcStatus,
}

/// `google.rpc.Status`, every field optional so odd bodies still parse.
#[derive(Deserialize, Default)]
struct RpcStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

impl RpcStatus {
    /// The FcmError detail's `errorCode`, if any.
    fn fcm_error_code(&self) -> Option<&str> {
        self.details.iter().find_map(|d| {
            let ty = d.get("@type")?.as_str()?;
            if ty.ends_with("google.firebase.fcm.v1.FcmError") {
                d.get("errorCode")?.as_str()
            } else {
                None
            }
        })
    }

    /// True when a BadRequest detail blames `message.token`.
    fn blames_token_field(&self) -> bool {
        self.details.iter().any(|d| {
            d.get("fieldViolations")
                .and_then(|v| v.as_array())
                .is_some_and(|vs| {
                    vs.iter()
                        .any(|v| v.get("field").and_then(|f| f.as_str()) == Some("message.token"))
                })
        })
    }
}

#[derive(Deserialize)]
struct SendResponse {
    name: Option<String>,
}

/// Classify one `messages:send` answer. `now` resolves HTTP-date Retry-After values.
pub(crate) fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> Verdict {
    if (200..300).contains(&status) {
        // Accepted even if the body is odd: resending would deliver twice.
        let provider_id = serde_json::from_slice::<SendResponse>(body)
            .ok()
            .and_then(|r| r.name);
        return Verdict::Outcome(PushOutcome::Delivered { provider_id });
    }
    let rpc = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_default();
    let code = rpc.fcm_error_code();
    let reason = reason(status, code, &rpc);
    let server_wait = retry_after.and_then(|v| parse_retry_after(v, now));
    let retry = |floor: Option<Duration>| PushOutcome::Retry {
        retry_after: server_wait.or(floor),
        reason: reason.clone(),
    };

    let outcome = match (status, code) {
        (_, Some("UNREGISTERED")) => invalid_token(&reason),
        (_, Some("SENDER_ID_MISMATCH")) => invalid_token(&reason),
        (_, Some("INVALID_ARGUMENT")) | (400, None) if is_bad_token(&rpc) => invalid_token(&reason),
        (_, Some("INVALID_ARGUMENT")) => PushOutcome::Permanent { reason },
        (_, Some("QUOTA_EXCEEDED")) => retry(Some(QUOTA_RETRY_FLOOR)),
        (_, Some("UNAVAILABLE" | "INTERNAL")) => retry(Some(UNAVAILABLE_RETRY_FLOOR)),
        // APNS_AUTH_ERROR is the legacy name of THIRD_PARTY_AUTH_ERROR.
        (_, Some("THIRD_PARTY_AUTH_ERROR" | "APNS_AUTH_ERROR")) => {
            PushOutcome::Misconfigured { reason }
        }
        // Any other 401 is about our access token: the sender refreshes it once.
        (401, _) => return Verdict::Unauthorized(reason),
        // Unknown or absent errorCode: fall back on the HTTP status.
        (429, _) => retry(Some(QUOTA_RETRY_FLOOR)),
        (408 | 425, _) => retry(None),
        (500..=599, _) => retry(Some(UNAVAILABLE_RETRY_FLOOR)),
        // PERMISSION_DENIED (wrong project, missing IAM role) or NOT_FOUND (wrong base URL or
        // project): the configuration is wrong, hold deliveries rather than drop them.
        (403 | 404, _) => PushOutcome::Misconfigured { reason },
        // Redirects are not followed (they could carry the bearer token elsewhere).
        (300..=399, _) => PushOutcome::Misconfigured { reason },
        (400..=499, _) => PushOutcome::Permanent { reason },
        // 1xx or garbage: nothing was decided, try again.
        _ => retry(None),
    };
    Verdict::Outcome(outcome)
}

fn invalid_token(reason: &str) -> PushOutcome {
    PushOutcome::InvalidToken {
        reason: reason.to_owned(),
        since: None,
    }
}

fn is_bad_token(rpc: &RpcStatus) -> bool {
    rpc.message.to_ascii_lowercase().contains(BAD_TOKEN_MESSAGE) || rpc.blames_token_field()
}

/// `"<errorCode or status> (<http>): <message>"`, bounded in length.
fn reason(status: u16, code: Option<&str>, rpc: &RpcStatus) -> String {
    let name = code
        .or((!rpc.status.is_empty()).then_some(rpc.status.as_str()))
        .unwrap_or("HTTP");
    let mut out = format!("{name} ({status})");
    if !rpc.message.is_empty() {
        out.push_str(": ");
        out.extend(rpc.message.chars().take(MAX_MESSAGE));
    }
    out
}

/// `Retry-After` as delta-seconds or an HTTP-date; `None` when unparseable.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let at = SystemTime::from(at.with_timezone(&chrono::Utc));
        // A date in the past means "now".
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(status: u16, rpc_status: &str, message: &str, code: Option<&str>) -> Vec<u8> {
        let mut details = vec![];
        if let Some(code) = code {
            details.push(json!({
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": code,
            }));
        }
        json!({"error": {"code": status, "message": message, "status": rpc_status, "details": details}})
            .to_string()
            .into_bytes()
    }

    fn run(status: u16, retry_after: Option<&str>, body: &[u8]) -> Verdict {
        classify(status, retry_after, body, SystemTime::UNIX_EPOCH)
    }

    fn outcome(status: u16, retry_after: Option<&str>, body: &[u8]) -> PushOutcome {
        match run(status, retry_after, body) {
            Verdict::Outcome(o) => o,
            Verdict::Unauthorized(r) => panic!("unexpected refresh: {r}"),
        }
    }

    #[test]
    fn row_200_success_carries_message_name() {
        let b = br#"{"name":"projects/herald-test/messages/0:1%abc"}"#;
        assert_eq!(
            outcome(200, None, b),
            PushOutcome::Delivered {
                provider_id: Some("projects/herald-test/messages/0:1%abc".into())
            }
        );
        assert_eq!(
            outcome(200, None, b"not json"),
            PushOutcome::Delivered { provider_id: None }
        );
    }

    #[test]
    fn row_404_unregistered_prunes() {
        let b = body(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            Some("UNREGISTERED"),
        );
        match outcome(404, None, &b) {
            PushOutcome::InvalidToken { reason, since } => {
                assert!(reason.starts_with("UNREGISTERED (404)"), "{reason}");
                assert_eq!(since, None);
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn row_400_invalid_argument_bad_token_prunes() {
        let msg = "The registration token is not a valid FCM registration token";
        let b = body(400, "INVALID_ARGUMENT", msg, Some("INVALID_ARGUMENT"));
        assert!(matches!(
            outcome(400, None, &b),
            PushOutcome::InvalidToken { .. }
        ));
        // Same verdict when only a BadRequest field violation names message.token.
        let b = json!({"error": {"code": 400, "message": "Request contains an invalid argument.",
            "status": "INVALID_ARGUMENT", "details": [
              {"@type": "type.googleapis.com/google.rpc.BadRequest",
               "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]},
              {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}});
        let b = b.to_string().into_bytes();
        assert!(matches!(
            outcome(400, None, &b),
            PushOutcome::InvalidToken { .. }
        ));
    }

    #[test]
    fn row_400_invalid_argument_other_is_permanent() {
        let b = json!({"error": {"code": 400, "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 1",
            "status": "INVALID_ARGUMENT", "details": [
              {"@type": "type.googleapis.com/google.rpc.BadRequest",
               "fieldViolations": [{"field": "message.data[0].value", "description": "Invalid value"}]},
              {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}});
        match outcome(400, None, b.to_string().as_bytes()) {
            PushOutcome::Permanent { reason } => {
                assert!(
                    reason.starts_with("INVALID_ARGUMENT (400): Invalid value"),
                    "{reason}"
                )
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn row_403_sender_id_mismatch_prunes() {
        let b = body(
            403,
            "PERMISSION_DENIED",
            "SenderId mismatch",
            Some("SENDER_ID_MISMATCH"),
        );
        assert!(matches!(
            outcome(403, None, &b),
            PushOutcome::InvalidToken { .. }
        ));
    }

    #[test]
    fn row_429_quota_exceeded_honours_retry_after_else_floor() {
        let b = body(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded",
            Some("QUOTA_EXCEEDED"),
        );
        assert_eq!(
            outcome(429, Some("17"), &b),
            PushOutcome::Retry {
                retry_after: Some(Duration::from_secs(17)),
                reason: "QUOTA_EXCEEDED (429): Quota exceeded".into()
            }
        );
        match outcome(429, None, &b) {
            PushOutcome::Retry { retry_after, .. } => {
                assert_eq!(retry_after, Some(QUOTA_RETRY_FLOOR))
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn row_503_unavailable_and_500_internal_retry() {
        let b = body(
            503,
            "UNAVAILABLE",
            "The service is currently unavailable.",
            Some("UNAVAILABLE"),
        );
        match outcome(503, Some("3"), &b) {
            PushOutcome::Retry { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(3)))
            }
            o => panic!("{o:?}"),
        }
        let b = body(
            500,
            "INTERNAL",
            "Internal error encountered.",
            Some("INTERNAL"),
        );
        match outcome(500, None, &b) {
            PushOutcome::Retry {
                retry_after,
                reason,
            } => {
                assert_eq!(retry_after, Some(UNAVAILABLE_RETRY_FLOOR));
                assert!(reason.starts_with("INTERNAL (500)"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn row_401_third_party_auth_error_is_misconfigured() {
        let b = body(
            401,
            "UNAUTHENTICATED",
            "Auth error from APNS or Web Push Service",
            Some("THIRD_PARTY_AUTH_ERROR"),
        );
        assert!(matches!(
            outcome(401, None, &b),
            PushOutcome::Misconfigured { .. }
        ));
    }

    #[test]
    fn row_401_without_detail_asks_for_refresh() {
        let b = body(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            None,
        );
        assert!(matches!(run(401, None, &b), Verdict::Unauthorized(_)));
        assert!(matches!(run(401, None, b""), Verdict::Unauthorized(_)));
    }

    #[test]
    fn unknown_codes_fall_back_on_status() {
        let unknown = |status| body(status, "WHATEVER", "new in 2031", Some("BRAND_NEW_CODE"));
        assert!(matches!(
            outcome(400, None, &unknown(400)),
            PushOutcome::Permanent { .. }
        ));
        assert!(matches!(
            run(401, None, &unknown(401)),
            Verdict::Unauthorized(_)
        ));
        assert!(matches!(
            outcome(403, None, &unknown(403)),
            PushOutcome::Misconfigured { .. }
        ));
        assert!(matches!(
            outcome(404, None, &unknown(404)),
            PushOutcome::Misconfigured { .. }
        ));
        assert!(matches!(
            outcome(413, None, &unknown(413)),
            PushOutcome::Permanent { .. }
        ));
        assert!(matches!(
            outcome(429, None, &unknown(429)),
            PushOutcome::Retry { .. }
        ));
        assert!(matches!(outcome(502, Some("2"), &unknown(502)),
            PushOutcome::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(2)));
        assert!(matches!(
            outcome(408, None, b""),
            PushOutcome::Retry {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            outcome(302, None, b""),
            PushOutcome::Misconfigured { .. }
        ));
        assert!(matches!(outcome(103, None, b""), PushOutcome::Retry { .. }));
        assert!(matches!(outcome(999, None, b""), PushOutcome::Retry { .. }));
        // UNSPECIFIED_ERROR on a 400 is still a bad message, not a bad token.
        let b = body(400, "INVALID_ARGUMENT", "odd", Some("UNSPECIFIED_ERROR"));
        assert!(matches!(
            outcome(400, None, &b),
            PushOutcome::Permanent { .. }
        ));
    }

    #[test]
    fn non_json_bodies_use_the_status() {
        let html = b"<html><body>502 Bad Gateway</body></html>";
        match outcome(502, None, html) {
            PushOutcome::Retry { reason, .. } => assert_eq!(reason, "HTTP (502)"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            outcome(400, None, html),
            PushOutcome::Permanent { .. }
        ));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("99999999999", now), Some(RETRY_AFTER_CAP));
        // An unparseable header falls back on the floor.
        let b = body(429, "RESOURCE_EXHAUSTED", "", Some("QUOTA_EXCEEDED"));
        assert!(matches!(outcome(429, Some("soon"), &b),
            PushOutcome::Retry { retry_after: Some(d), .. } if d == QUOTA_RETRY_FLOOR));
    }

    #[test]
    fn reasons_are_bounded() {
        let long = "x".repeat(10_000);
        let b = body(400, "INVALID_ARGUMENT", &long, Some("INVALID_ARGUMENT"));
        match outcome(400, None, &b) {
            PushOutcome::Permanent { reason } => assert!(reason.len() < 300),
            o => panic!("{o:?}"),
        }
    }
}
