//! The fake's `POST /v1/projects/{project}/messages:send`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
use serde_json::{Map, Value, json};

use super::{Answer, Behaviour, FakeFcmRequest, Shared, json};

/// FCM's payload limit (data + notification).
const MAX_PAYLOAD: usize = 4096;
/// FCM's longest TTL: 4 weeks.
const MAX_TTL_SECS: u64 = 28 * 24 * 3600;
const BODY_FIELDS: &[&str] = &["validate_only", "message"];
const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
];

/// A google.rpc error body; with an FcmError detail when `fcm_code` is given and a BadRequest
/// detail when there are field violations.
pub(super) fn rpc_error(
    status: StatusCode,
    rpc_status: &str,
    message: &str,
    fcm_code: Option<&str>,
    violations: &[(String, String)],
) -> Answer {
    let mut details = vec![];
    if !violations.is_empty() {
        let fields: Vec<Value> = violations
            .iter()
            .map(|(field, description)| json!({"field": field, "description": description}))
            .collect();
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": fields,
        }));
    }
    if let Some(code) = fcm_code {
        details.push(json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }));
    }
    let mut error = json!({"code": status.as_u16(), "message": message, "status": rpc_status});
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    json(status, &json!({ "error": error }))
}

fn invalid_argument(message: &str, violations: &[(String, String)]) -> Answer {
    rpc_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        message,
        Some("INVALID_ARGUMENT"),
        violations,
    )
}

/// Why a message is refused: 400 INVALID_ARGUMENT, optionally blaming one field.
struct Invalid {
    message: String,
    field: Option<(String, String)>,
}

impl Invalid {
    fn plain(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            field: None,
        }
    }

    fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            message: "Request contains an invalid argument.".into(),
            field: Some((field.into(), description.into())),
        }
    }

    fn answer(self) -> Answer {
        invalid_argument(&self.message, self.field.as_slice())
    }
}

/// Append to the request log.
pub(super) fn record(
    shared: &Shared,
    parts: &Parts,
    body: &Bytes,
    authorized: Option<bool>,
    status: StatusCode,
) {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let entry = FakeFcmRequest {
        path: parts.uri.path().to_owned(),
        version: parts.version,
        authorized: authorized.unwrap_or(false),
        device_token: body["message"]["token"].as_str().map(str::to_owned),
        validate_only: body["validate_only"].as_bool().unwrap_or(false),
        body,
        status: status.as_u16(),
        received_at: Instant::now(),
    };
    shared.lock().requests.push(entry);
}

/// Answer one send: auth, project, message checks, then the device token's script.
pub(super) async fn send(shared: &Shared, parts: &Parts, body: &Bytes) -> Answer {
    let authorized = is_authorized(shared, parts);
    let (answer, delay) = decide(shared, parts, body, authorized);
    // Recorded on arrival, so a send the client gave up on (timeout) is still visible.
    record(shared, parts, body, Some(authorized), answer.status());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    answer
}

fn is_authorized(shared: &Shared, parts: &Parts) -> bool {
    let Some(token) = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    shared
        .lock()
        .issued
        .get(token)
        .is_some_and(|expires| Instant::now() < *expires)
}

fn decide(shared: &Shared, parts: &Parts, body: &Bytes, authorized: bool) -> (Answer, Duration) {
    let project = parts
        .uri
        .path()
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.strip_suffix("/messages:send"));
    let Some(project) = project else {
        let answer = rpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Not found", None, &[]);
        return (answer, Duration::ZERO);
    };
    if !authorized {
        let answer = rpc_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential.",
            None,
            &[],
        );
        return (answer, Duration::ZERO);
    }
    if project != shared.project_id {
        let message = format!(
            "Permission 'cloudmessaging.messages.create' denied on resource \
             '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
        );
        let answer = rpc_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            &message,
            None,
            &[],
        );
        return (answer, Duration::ZERO);
    }
    let (message, validate_only) = match check_body(body) {
        Ok(ok) => ok,
        Err(invalid) => return (invalid.answer(), Duration::ZERO),
    };
    let behaviour = match message.get("token").and_then(Value::as_str) {
        Some(token) => next_behaviour(shared, token),
        // Topic and condition sends just succeed.
        None => Behaviour::Success,
    };
    answer(shared, project, behaviour, validate_only)
}

/// The script's next answer for `token` (the last one repeats), else the default.
fn next_behaviour(shared: &Shared, token: &str) -> Behaviour {
    let mut s = shared.lock();
    match s.scripts.get_mut(token) {
        Some(queue) if queue.len() > 1 => queue.pop_front().unwrap_or(Behaviour::Success),
        Some(queue) => queue.front().cloned().unwrap_or(Behaviour::Success),
        None => s.default.clone(),
    }
}

fn answer(
    shared: &Shared,
    project: &str,
    behaviour: Behaviour,
    validate_only: bool,
) -> (Answer, Duration) {
    let with_retry_after = |mut a: Answer, secs: Option<u64>| {
        if let Some(v) = secs.and_then(|s| http::HeaderValue::from_str(&s.to_string()).ok()) {
            a.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        a
    };
    let answer = match behaviour {
        Behaviour::Success => {
            // validate_only: FCM answers with this fixed name and delivers nothing.
            let name = if validate_only {
                format!("projects/{project}/messages/fake_message_id")
            } else {
                let mut s = shared.lock();
                let n = s.next_message;
                s.next_message += 1;
                format!("projects/{project}/messages/0:{n}%fake")
            };
            json(StatusCode::OK, &json!({ "name": name }))
        }
        Behaviour::Unregistered => rpc_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Requested entity was not found.",
            Some("UNREGISTERED"),
            &[],
        ),
        Behaviour::InvalidToken => invalid_argument(
            "The registration token is not a valid FCM registration token",
            &[],
        ),
        Behaviour::SenderIdMismatch => rpc_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "SenderId mismatch",
            Some("SENDER_ID_MISMATCH"),
            &[],
        ),
        Behaviour::QuotaExceeded { retry_after } => with_retry_after(
            rpc_error(
                StatusCode::TOO_MANY_REQUESTS,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Send messages'.",
                Some("QUOTA_EXCEEDED"),
                &[],
            ),
            retry_after,
        ),
        Behaviour::Unavailable { retry_after } => with_retry_after(
            rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                Some("UNAVAILABLE"),
                &[],
            ),
            retry_after,
        ),
        Behaviour::Internal => rpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "Internal error encountered.",
            Some("INTERNAL"),
            &[],
        ),
        Behaviour::ThirdPartyAuthError => rpc_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Auth error from APNS or Web Push Service",
            Some("THIRD_PARTY_AUTH_ERROR"),
            &[],
        ),
        Behaviour::Delay(delay, inner) => {
            let (answer, more) = answer(shared, project, *inner, validate_only);
            return (answer, delay + more);
        }
        Behaviour::Raw {
            status,
            body,
            retry_after,
        } => {
            let mut a = json(StatusCode::OK, &Value::Null);
            *a.body_mut() = http_body_util::Full::new(Bytes::from(body));
            *a.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            if let Some(v) = retry_after.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                a.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            a
        }
    };
    (answer, Duration::ZERO)
}

/// Validate the body as FCM does; `Ok((message, validate_only))`.
fn check_body(body: &Bytes) -> Result<(Map<String, Value>, bool), Invalid> {
    let Ok(Value::Object(mut root)) = serde_json::from_slice::<Value>(body) else {
        return Err(Invalid::plain("Invalid JSON payload received."));
    };
    if let Some(unknown) = root.keys().find(|k| !BODY_FIELDS.contains(&k.as_str())) {
        let m = format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
        );
        return Err(Invalid::plain(m));
    }
    let validate_only = match root.remove("validate_only") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(Invalid::field("validate_only", "Invalid value (TYPE_BOOL)")),
    };
    let Some(Value::Object(message)) = root.remove("message") else {
        return Err(Invalid::field("message", "Message must be set"));
    };
    check_message(&message)?;
    Ok((message, validate_only))
}

fn check_message(m: &Map<String, Value>) -> Result<(), Invalid> {
    if let Some(unknown) = m.keys().find(|k| !MESSAGE_FIELDS.contains(&k.as_str())) {
        let m = format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\" at 'message': Cannot find field."
        );
        return Err(Invalid::plain(m));
    }
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|t| {
            m.get(**t)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    if targets != 1 {
        return Err(Invalid::field(
            "message",
            "Exactly one of token, topic or condition must be specified",
        ));
    }
    let mut size = 0;
    if let Some(data) = m.get("data") {
        let Value::Object(data) = data else {
            return Err(Invalid::field("message.data", "Invalid value (TYPE_MAP)"));
        };
        for (i, (key, value)) in data.iter().enumerate() {
            let Value::String(value) = value else {
                let field = format!("message.data[{i}].value");
                return Err(Invalid::field(
                    field,
                    format!("Invalid value at 'message.data[{i}].value' (TYPE_STRING), {value}"),
                ));
            };
            if key == "from"
                || key == "message_type"
                || key.starts_with("google")
                || key.starts_with("gcm")
            {
                return Err(Invalid::field(
                    "message.data",
                    format!("Invalid data payload key: {key}"),
                ));
            }
            size += key.len() + value.len();
        }
    }
    if let Some(n) = m.get("notification") {
        for part in ["title", "body"] {
            size += n.get(part).and_then(Value::as_str).map_or(0, str::len);
        }
    }
    if size > MAX_PAYLOAD {
        return Err(Invalid::field(
            "message",
            format!("Message is too big: {size} bytes > {MAX_PAYLOAD}"),
        ));
    }
    if let Some(android) = m.get("android") {
        if let Some(ttl) = android.get("ttl")
            && !ttl.as_str().is_some_and(valid_ttl)
        {
            return Err(Invalid::field(
                "message.android.ttl",
                format!("Invalid value: {ttl}"),
            ));
        }
        if let Some(p) = android.get("priority")
            && !matches!(p.as_str(), Some("NORMAL" | "HIGH"))
        {
            return Err(Invalid::field(
                "message.android.priority",
                format!("Invalid value: {p}"),
            ));
        }
    }
    if let Some(headers) = m.get("apns").and_then(|a| a.get("headers")) {
        let all_strings = headers
            .as_object()
            .is_some_and(|h| h.values().all(Value::is_string));
        if !all_strings {
            return Err(Invalid::field(
                "message.apns.headers",
                "Invalid value (TYPE_STRING)",
            ));
        }
    }
    Ok(())
}

/// `"<seconds>[.<up to 9 digits>]s"`, at most four weeks.
fn valid_ttl(ttl: &str) -> bool {
    let Some(number) = ttl.strip_suffix('s') else {
        return false;
    };
    let (secs, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || !digits(secs) || !digits(frac) || frac.len() > 9 || number.ends_with('.')
    {
        return false;
    }
    let Ok(secs) = secs.parse::<u64>() else {
        return false;
    };
    secs < MAX_TTL_SECS || (secs == MAX_TTL_SECS && frac.bytes().all(|b| b == b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_syntax() {
        for ok in [
            "0s",
            "3600s",
            "1.5s",
            "0.000000001s",
            "2419200s",
            "2419200.000s",
        ] {
            assert!(valid_ttl(ok), "{ok}");
        }
        for bad in [
            "",
            "s",
            "3600",
            "1.s",
            ".5s",
            "-1s",
            "1.0000000001s",
            "2419201s",
            "2419200.5s",
            "1 s",
        ] {
            assert!(!valid_ttl(bad), "{bad}");
        }
    }

    fn status(body: Value) -> Option<u16> {
        check_body(&Bytes::from(body.to_string()))
            .err()
            .map(|i| i.answer().status().as_u16())
    }

    #[test]
    fn message_checks() {
        assert_eq!(status(json!({"message": {"token": "t"}})), None);
        assert_eq!(
            status(json!({"message": {"token": "t", "topic": "x"}})),
            Some(400)
        );
        assert_eq!(status(json!({"message": {}})), Some(400));
        assert_eq!(
            status(json!({"message": {"token": "t", "data": {"a": 1}}})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t", "data": {"from": "x"}}})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t", "bogus": 1}})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t"}, "validate_only": "yes"})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t", "android": {"ttl": "1h"}}})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t", "android": {"priority": "URGENT"}}})),
            Some(400)
        );
        assert_eq!(
            status(json!({"message": {"token": "t", "apns": {"headers": {"apns-priority": 10}}}})),
            Some(400)
        );
        let big = "x".repeat(MAX_PAYLOAD);
        assert_eq!(
            status(json!({"message": {"token": "t", "data": {"k": big}}})),
            Some(400)
        );
        let fits = "x".repeat(MAX_PAYLOAD - 1);
        assert_eq!(
            status(json!({"message": {"token": "t", "data": {"k": fits}}})),
            None
        );
    }
}
