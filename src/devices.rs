//! Devices: the push tokens apps register, parsed and validated at the edge.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::FieldError;

/// Push platform of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging.
    Fcm,
}

impl Platform {
    /// Wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apns => "apns",
            Self::Fcm => "fcm",
        }
    }

    /// Parse the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "apns" => Some(Self::Apns),
            "fcm" => Some(Self::Fcm),
            _ => None,
        }
    }
}

/// APNs environment of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    /// api.push.apple.com
    Production,
    /// api.sandbox.push.apple.com
    Sandbox,
}

impl ApnsEnvironment {
    /// Wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Sandbox => "sandbox",
        }
    }

    /// Parse the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "production" => Some(Self::Production),
            "sandbox" => Some(Self::Sandbox),
            _ => None,
        }
    }
}

/// Whether a device is still targeted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Receives pushes.
    Active,
    /// The provider said the token is dead; never targeted again until re-registered.
    Invalid,
}

impl DeviceStatus {
    /// Parse the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "invalid" => Some(Self::Invalid),
            _ => None,
        }
    }
}

/// A validated registration request: past the edge, every field is known good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    /// Platform.
    pub platform: Platform,
    /// Token, checked against the platform's format.
    pub token: String,
    /// APNs environment; `None` for FCM.
    pub environment: Option<ApnsEnvironment>,
    /// App id (selects push credentials).
    pub app_id: String,
    /// BCP 47 locale.
    pub locale: Option<String>,
    /// App version string.
    pub app_version: Option<String>,
}

/// A registered device, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Device id (UUID v7).
    pub id: Uuid,
    /// Platform.
    pub platform: Platform,
    /// Push token.
    pub token: String,
    /// APNs environment (null for FCM).
    pub environment: Option<ApnsEnvironment>,
    /// App id.
    pub app_id: String,
    /// Locale.
    pub locale: Option<String>,
    /// App version.
    pub app_version: Option<String>,
    /// `active` or `invalid`.
    pub status: DeviceStatus,
    /// Why the provider rejected the token.
    pub invalid_reason: Option<String>,
    /// First registration by this user.
    pub created_at: DateTime<Utc>,
    /// Last registration or refresh.
    pub last_seen_at: DateTime<Utc>,
    /// Last successful push, to within a second (a burst writes it once).
    pub last_push_at: Option<DateTime<Utc>>,
    /// Updates in the user's log after this device's last ack (`GET /v1/devices` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen: Option<i64>,
    /// When the app last (re)registered this token (not part of the API).
    #[serde(skip)]
    pub registered_at: DateTime<Utc>,
}

/// Check an APNs token: even-length hex, 64–200 characters.
pub fn validate_apns_token(token: &str) -> Result<(), &'static str> {
    let n = token.len();
    if !(64..=200).contains(&n) {
        return Err("an APNs token is 64 to 200 hexadecimal characters");
    }
    if !n.is_multiple_of(2) {
        return Err("an APNs token has an even number of hexadecimal characters");
    }
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("an APNs token contains only hexadecimal characters");
    }
    Ok(())
}

/// Check an FCM token: 1–4096 characters of `[A-Za-z0-9_:\-.]`.
pub fn validate_fcm_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() || token.len() > 4096 {
        return Err("an FCM token is 1 to 4096 characters");
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.'))
    {
        return Err("an FCM token contains only letters, digits and _ : - .");
    }
    Ok(())
}

/// Check a locale tag loosely (BCP 47 shape: letters, digits, `-`/`_`, at most 35 characters).
pub fn validate_locale(locale: &str) -> Result<(), &'static str> {
    let ok = !locale.is_empty()
        && locale.len() <= 35
        && locale
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err("a locale is a BCP 47 tag such as en-US (at most 35 characters)")
    }
}

/// Field error helper for the API layer.
pub fn token_error(platform: Platform, token: &str) -> Option<FieldError> {
    let result = match platform {
        Platform::Apns => validate_apns_token(token),
        Platform::Fcm => validate_fcm_token(token),
    };
    result.err().map(|m| FieldError::new("token", m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn apns_token_rules() {
        assert!(validate_apns_token(&"ab".repeat(32)).is_ok());
        assert!(validate_apns_token(&"ab".repeat(100)).is_ok());
        assert!(validate_apns_token(&"ab".repeat(31)).is_err());
        assert!(validate_apns_token(&"ab".repeat(101)).is_err());
        assert!(validate_apns_token(&format!("{}a", "ab".repeat(32))).is_err());
        assert!(validate_apns_token(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn fcm_token_rules() {
        assert!(validate_fcm_token("abc:DEF-ghi_jkl.123").is_ok());
        assert!(validate_fcm_token("").is_err());
        assert!(validate_fcm_token(&"a".repeat(4097)).is_err());
        assert!(validate_fcm_token("has space").is_err());
        assert!(validate_fcm_token("slash/").is_err());
    }

    proptest! {
        #[test]
        fn valid_hex_tokens_pass(bytes in proptest::collection::vec(any::<u8>(), 32..=100)) {
            prop_assert!(validate_apns_token(&hex::encode(bytes)).is_ok());
        }

        #[test]
        fn fcm_validation_never_panics(s in "\\PC{0,200}") {
            let _ = validate_fcm_token(&s);
        }
    }
}
