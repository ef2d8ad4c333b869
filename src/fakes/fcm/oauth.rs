//! The fake's `POST /token`: Google's service-account JWT-bearer grant.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::json;

use super::{Answer, Shared, TokenFailure, json};

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Google refuses assertions valid for longer than an hour.
const MAX_ASSERTION_LIFETIME: u64 = 3600;
/// Clock skew tolerated on `iat` and `exp`.
const LEEWAY: u64 = 60;

#[derive(Deserialize)]
struct AssertionClaims {
    iat: Option<u64>,
    exp: u64,
    scope: Option<String>,
}

/// Answer one token request.
pub(super) async fn token(shared: &Shared, parts: &Parts, body: &Bytes) -> Answer {
    let (delay, failure) = {
        let mut s = shared.lock();
        s.token_requests += 1;
        (s.token_delay, s.token_failure)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match failure {
        Some(TokenFailure::InvalidGrant) => {
            return oauth_error("invalid_grant", "Invalid grant: account not found");
        }
        Some(TokenFailure::Unavailable) => {
            let mut answer = json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "temporarily_unavailable", "error_description": "Try again later"}),
            );
            answer.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
            return answer;
        }
        None => {}
    }
    let form_encoded = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_encoded {
        return oauth_error("invalid_request", "Expected a form-encoded body");
    }
    let mut grant_type = None;
    let mut assertion = None;
    for (k, v) in url::form_urlencoded::parse(body) {
        match k.as_ref() {
            "grant_type" => grant_type = Some(v.into_owned()),
            "assertion" => assertion = Some(v.into_owned()),
            _ => {}
        }
    }
    if grant_type.as_deref() != Some(GRANT_TYPE) {
        return oauth_error("unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = assertion else {
        return oauth_error("invalid_request", "Missing required parameter: assertion");
    };
    if let Err((error, description)) = verify(shared, &assertion) {
        return oauth_error(error, &description);
    }

    let access_token = format!("ya29.fake-{}", uuid::Uuid::new_v4().simple());
    let lifetime = {
        let mut s = shared.lock();
        let lifetime = s.token_lifetime;
        s.issued
            .insert(access_token.clone(), Instant::now() + lifetime);
        s.tokens_issued += 1;
        lifetime
    };
    json(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "expires_in": lifetime.as_secs().max(1),
            "token_type": "Bearer",
        }),
    )
}

/// Check the assertion as Google does: RS256 signature by the service account's key, `aud` =
/// this token endpoint, `iss` = client_email, a lifetime of at most an hour, the FCM scope.
fn verify(shared: &Shared, assertion: &str) -> Result<(), (&'static str, String)> {
    let invalid = |why: &str| ("invalid_grant", format!("Invalid JWT: {why}"));
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| invalid("malformed"))?;
    if header.alg != Algorithm::RS256 {
        return Err(invalid("alg must be RS256"));
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&shared.audiences);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    validation.leeway = LEEWAY;
    if let Some(email) = &shared.client_email {
        validation.set_issuer(&[email]);
    }
    let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &shared.public_key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => ("invalid_grant", "Invalid JWT Signature.".into()),
                ErrorKind::ExpiredSignature => invalid("Token must be a short-lived token"),
                _ => invalid(&e.to_string()),
            }
        })?;
    let claims = data.claims;
    let iat = claims.iat.ok_or_else(|| invalid("missing iat"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    if iat > now + LEEWAY {
        return Err(invalid("iat is in the future"));
    }
    if claims.exp <= iat || claims.exp - iat > MAX_ASSERTION_LIFETIME {
        return Err(invalid(
            "Token must be a short-lived token (60 minutes) and in a reasonable timeframe",
        ));
    }
    let scoped = claims
        .scope
        .as_deref()
        .is_some_and(|s| s.split_whitespace().any(|s| s == FCM_SCOPE));
    if !scoped {
        return Err((
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.".into(),
        ));
    }
    Ok(())
}

fn oauth_error(error: &str, description: &str) -> Answer {
    json(
        StatusCode::BAD_REQUEST,
        &json!({"error": error, "error_description": description}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::fcm::{FakeFcmOptions, State};
    use jsonwebtoken::{EncodingKey, Header};
    use std::sync::Mutex;

    const AUD: &str = "http://127.0.0.1:1/token";

    fn shared() -> Shared {
        let o = FakeFcmOptions::default();
        Shared {
            project_id: o.project_id,
            client_email: o.client_email,
            public_key: jsonwebtoken::DecodingKey::from_rsa_pem(&o.public_key_pem).unwrap(),
            audiences: vec![AUD.into()],
            state: Mutex::new(State {
                issued: Default::default(),
                scripts: Default::default(),
                default: super::super::Behaviour::Success,
                requests: vec![],
                token_requests: 0,
                tokens_issued: 0,
                token_failure: None,
                token_delay: Duration::ZERO,
                token_lifetime: Duration::from_secs(60),
                next_message: 1,
            }),
        }
    }

    fn key() -> EncodingKey {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/test-fcm-service-account.json"
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        EncodingKey::from_rsa_pem(v["private_key"].as_str().unwrap().as_bytes()).unwrap()
    }

    fn sign(claims: serde_json::Value, key: &EncodingKey) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(iat: u64, exp: u64) -> serde_json::Value {
        json!({"iss": super::super::TEST_CLIENT_EMAIL, "scope": FCM_SCOPE, "aud": AUD, "iat": iat, "exp": exp})
    }

    #[test]
    fn accepts_a_proper_assertion() {
        let t = now();
        verify(&shared(), &sign(claims(t, t + 3600), &key())).unwrap();
    }

    #[test]
    fn refuses_bad_assertions() {
        let (s, k, t) = (shared(), key(), now());
        let err = |c: serde_json::Value| verify(&s, &sign(c, &k)).unwrap_err();
        assert_eq!(err(claims(t, t + 3601)).0, "invalid_grant");
        assert_eq!(err(claims(t - 7200, t - 3600)).0, "invalid_grant");
        assert_eq!(err(claims(t + 600, t + 1200)).0, "invalid_grant");
        let mut c = claims(t, t + 60);
        c["aud"] = json!("https://oauth2.googleapis.com/token");
        assert_eq!(err(c).0, "invalid_grant");
        let mut c = claims(t, t + 60);
        c["iss"] = json!("someone@else.iam.gserviceaccount.com");
        assert_eq!(err(c).0, "invalid_grant");
        let mut c = claims(t, t + 60);
        c["scope"] = json!("https://www.googleapis.com/auth/cloud-platform");
        assert_eq!(err(c).0, "invalid_scope");
        // Signed with another key: an HS256 token is refused by alg, a tampered one by signature.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(t, t + 60),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert_eq!(verify(&s, &hs).unwrap_err().0, "invalid_grant");
        let good = sign(claims(t, t + 60), &k);
        let (head, sig) = good.rsplit_once('.').unwrap();
        let mid = sig.len() / 2;
        let flipped = if &sig[mid..=mid] == "A" { "B" } else { "A" };
        let tampered = format!("{head}.{}{flipped}{}", &sig[..mid], &sig[mid + 1..]);
        assert_eq!(
            verify(&s, &tampered).unwrap_err().1,
            "Invalid JWT Signature."
        );
    }
}
