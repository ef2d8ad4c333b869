//! The checks real APNs makes on a request, in the order it makes them.

use std::sync::Mutex;

use http::request::Parts;
use http::{HeaderMap, Method};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::providers::apns::token::{MAX_TOKEN_AGE, MIN_RENEWAL_INTERVAL};
use crate::providers::apns::{Clock, MAX_COLLAPSE_ID, ProviderClaims, PushType};

/// A rejection: status and Apple's reason.
pub(super) type Rejection = (u16, &'static str);

/// What verification learned, for the record.
#[derive(Debug, Default, Clone)]
pub(super) struct Checked {
    pub(super) device_token: Option<String>,
    pub(super) claims: Option<ProviderClaims>,
    pub(super) kid: Option<String>,
    pub(super) apns_id: Option<String>,
}

/// Server-wide verification settings.
pub(super) struct Verifier {
    pub(super) key_id: String,
    pub(super) team_id: String,
    pub(super) key: DecodingKey,
    pub(super) topics: Vec<String>,
    pub(super) clock: Clock,
    validation: Validation,
}

struct Accepted {
    jwt: String,
    claims: ProviderClaims,
    kid: String,
    at: i64,
}

/// Per-connection token state: Apple binds a provider token to the connection.
#[derive(Default)]
pub(super) struct ConnAuth {
    current: Mutex<Option<Accepted>>,
}

const APNS_HEADERS: [&str; 7] = [
    "authorization",
    "apns-topic",
    "apns-push-type",
    "apns-priority",
    "apns-id",
    "apns-expiration",
    "apns-collapse-id",
];

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn is_lower_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok() && !s.bytes().any(|b| b.is_ascii_uppercase())
}

impl Verifier {
    pub(super) fn new(
        key_id: String,
        team_id: String,
        key: DecodingKey,
        topics: Vec<String>,
        clock: Clock,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::ES256);
        // APNs tokens carry only iss and iat; age is checked by hand below.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        Self {
            key_id,
            team_id,
            key,
            topics,
            clock,
            validation,
        }
    }

    /// Checks method, path, headers and token; the body is checked by [`Verifier::payload`].
    pub(super) fn request(
        &self,
        parts: &Parts,
        conn: &ConnAuth,
        out: &mut Checked,
    ) -> Result<PushType, Rejection> {
        if parts.method != Method::POST {
            return Err((405, "MethodNotAllowed"));
        }
        let token = parts
            .uri
            .path()
            .strip_prefix("/3/device/")
            .ok_or((404, "BadPath"))?;
        if token.is_empty() {
            return Err((400, "MissingDeviceToken"));
        }
        if token.contains('/') {
            return Err((404, "BadPath"));
        }
        out.device_token = Some(token.to_owned());
        if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((400, "BadDeviceToken"));
        }
        let h = &parts.headers;
        if APNS_HEADERS
            .iter()
            .any(|n| h.get_all(*n).iter().count() > 1)
        {
            return Err((400, "DuplicateHeaders"));
        }
        if let Some(id) = h.get("apns-id") {
            let id = id.to_str().map_err(|_| (400, "BadMessageId"))?;
            if !is_lower_uuid(id) {
                return Err((400, "BadMessageId"));
            }
            out.apns_id = Some(id.to_owned());
        }
        self.token(h, conn, out)?;
        let topic = match h.get("apns-topic") {
            None => return Err((400, "MissingTopic")),
            Some(t) => t.to_str().map_err(|_| (400, "BadTopic"))?,
        };
        if topic.is_empty() {
            return Err((400, "MissingTopic"));
        }
        if !self.topics.is_empty() && !self.topics.iter().any(|t| t == topic) {
            return Err((400, "TopicDisallowed"));
        }
        // Apple still accepts a missing push type (it assumes alert); an unknown one it refuses.
        let push_type = match h.get("apns-push-type") {
            None => PushType::Alert,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(PushType::parse)
                .ok_or((400, "InvalidPushType"))?,
        };
        if let Some(p) = h.get("apns-priority") {
            match p.to_str().ok() {
                Some("10") if push_type == PushType::Background => {
                    return Err((400, "BadPriority"));
                }
                Some("1" | "5" | "10") => {}
                _ => return Err((400, "BadPriority")),
            }
        }
        if let Some(e) = h.get("apns-expiration") {
            let ok = e
                .to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some();
            if !ok {
                return Err((400, "BadExpirationDate"));
            }
        }
        if h.get("apns-collapse-id")
            .is_some_and(|c| c.len() > MAX_COLLAPSE_ID)
        {
            return Err((400, "BadCollapseId"));
        }
        Ok(push_type)
    }

    fn token(&self, h: &HeaderMap, conn: &ConnAuth, out: &mut Checked) -> Result<(), Rejection> {
        let auth = header(h, "authorization").ok_or((403, "MissingProviderToken"))?;
        let jwt = auth
            .strip_prefix("bearer ")
            .or_else(|| auth.strip_prefix("Bearer "))
            .ok_or((403, "InvalidProviderToken"))?;
        let now = self.clock.now();
        let mut current = conn.current.lock().unwrap_or_else(|e| e.into_inner());
        // The token in use on this connection was verified already: only its age can change.
        if let Some(acc) = current.as_ref().filter(|a| a.jwt == jwt) {
            out.claims = Some(acc.claims.clone());
            out.kid = Some(acc.kid.clone());
            return self.age(&acc.claims, now);
        }
        let data = jsonwebtoken::decode::<ProviderClaims>(jwt, &self.key, &self.validation)
            .map_err(|_| (403, "InvalidProviderToken"))?;
        let kid = data.header.kid.unwrap_or_default();
        out.claims = Some(data.claims.clone());
        out.kid = Some(kid.clone());
        if kid != self.key_id || data.claims.iss != self.team_id {
            return Err((403, "InvalidProviderToken"));
        }
        self.age(&data.claims, now)?;
        if let Some(prev) = current.as_ref()
            && now - prev.at < MIN_RENEWAL_INTERVAL.as_secs() as i64
        {
            return Err((429, "TooManyProviderTokenUpdates"));
        }
        *current = Some(Accepted {
            jwt: jwt.to_owned(),
            claims: data.claims,
            kid,
            at: now,
        });
        Ok(())
    }

    fn age(&self, claims: &ProviderClaims, now: i64) -> Result<(), Rejection> {
        // A token from the future (beyond a minute of skew) is as wrong as a forged one.
        if claims.iat > now + 60 {
            return Err((403, "InvalidProviderToken"));
        }
        if now - claims.iat > MAX_TOKEN_AGE.as_secs() as i64 {
            return Err((403, "ExpiredProviderToken"));
        }
        Ok(())
    }

    /// Checks the payload size for the push type.
    pub(super) fn payload(&self, push_type: PushType, len: usize) -> Result<(), Rejection> {
        if len == 0 {
            return Err((400, "PayloadEmpty"));
        }
        if len > push_type.max_payload() {
            return Err((413, "PayloadTooLarge"));
        }
        Ok(())
    }
}
