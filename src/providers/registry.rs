//! Every configured app's push credentials, built once at start-up: a device's `appId`
//! selects its APNs and FCM senders, so one Herald serves several bundle ids and Firebase
//! projects.

use std::collections::HashMap;

use super::AppConfig;
use super::apns::ApnsSender;
use super::fcm::FcmSender;

/// The senders of one app; a missing one means that platform is off for the app.
#[derive(Clone, Default)]
pub struct AppSenders {
    /// iOS pushes.
    pub apns: Option<ApnsSender>,
    /// Android pushes.
    pub fcm: Option<FcmSender>,
}

/// App id → senders.
#[derive(Clone, Default)]
pub struct Providers {
    apps: HashMap<String, AppSenders>,
}

/// Why an app's credentials could not be loaded; names the configuration key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ProvidersError {
    /// e.g. `apps[1].apns`.
    pub key: String,
    /// What is wrong (never key material).
    pub reason: String,
}

impl Providers {
    /// Load every app's credentials; the first bad one stops start-up.
    pub fn from_config(apps: &[AppConfig]) -> Result<Self, ProvidersError> {
        let mut built = HashMap::new();
        for (i, app) in apps.iter().enumerate() {
            let apns = match &app.apns {
                Some(cfg) => Some(ApnsSender::new(&app.id, cfg).map_err(|e| ProvidersError {
                    key: format!("apps[{i}].apns"),
                    reason: e.to_string(),
                })?),
                None => None,
            };
            let fcm = match &app.fcm {
                Some(cfg) => Some(FcmSender::new(&app.id, cfg).map_err(|e| ProvidersError {
                    key: format!("apps[{i}].fcm"),
                    reason: e.to_string(),
                })?),
                None => None,
            };
            if apns.is_none() && fcm.is_none() {
                tracing::warn!(app = %app.id, "app has neither APNs nor FCM credentials: its devices get no pushes");
            }
            built.insert(app.id.clone(), AppSenders { apns, fcm });
        }
        Ok(Self { apps: built })
    }

    /// The APNs sender of `app_id`, when that app has APNs credentials.
    pub fn apns(&self, app_id: &str) -> Option<&ApnsSender> {
        self.apps.get(app_id)?.apns.as_ref()
    }

    /// The FCM sender of `app_id`, when that app has FCM credentials.
    pub fn fcm(&self, app_id: &str) -> Option<&FcmSender> {
        self.apps.get(app_id)?.fcm.as_ref()
    }
}
