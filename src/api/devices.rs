//! `/v1/devices`: apps register, list and remove their push tokens.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::input::{Fields, JsonObject};
use crate::auth::AuthUser;
use crate::devices::{self, ApnsEnvironment, Device, NewDevice, Platform};
use crate::error::{ApiError, Problem};

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register_device, list_devices))
        .routes(routes!(delete_device))
}

/// Registration body (documentation only: the body is read field by field for exact errors).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = RegisterDevice)]
struct RegisterDeviceDoc {
    /// `apns` or `fcm`.
    platform: Platform,
    /// APNs: even-length hex, 64–200 characters. FCM: 1–4096 of `[A-Za-z0-9_:-.]`.
    token: String,
    /// APNs only; default `production`.
    environment: Option<ApnsEnvironment>,
    /// Defaults to the first configured app.
    #[schema(rename = "appId")]
    app_id: Option<String>,
    /// BCP 47 tag, e.g. `en-US`.
    locale: Option<String>,
    /// App version string.
    #[schema(rename = "appVersion")]
    app_version: Option<String>,
}

/// `GET /v1/devices` answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    /// The user's devices, active and invalid.
    pub devices: Vec<Device>,
}

fn parse_registration(body: &JsonObject, state: &AppState) -> Result<NewDevice, ApiError> {
    let mut f = Fields::new(&body.0);
    let platform = match f.req_str("platform") {
        Some(p) => match Platform::parse(p) {
            Some(p) => Some(p),
            None => {
                f.error("platform", "must be \"apns\" or \"fcm\"");
                None
            }
        },
        None => None,
    };
    let token = f.req_str("token");
    if let (Some(platform), Some(token)) = (platform, token)
        && let Some(err) = devices::token_error(platform, token)
    {
        f.error(&err.field, err.message);
    }
    let environment = match (platform, f.opt_str("environment")) {
        (Some(Platform::Apns), None) => Some(ApnsEnvironment::Production),
        (Some(Platform::Apns), Some(e)) => match ApnsEnvironment::parse(e) {
            Some(env) => Some(env),
            None => {
                f.error("environment", "must be \"production\" or \"sandbox\"");
                None
            }
        },
        // FCM has no environments; "production" is tolerated for clients that always send one.
        (Some(Platform::Fcm), Some(e)) if e != "production" => {
            f.error("environment", "applies to apns devices only");
            None
        }
        _ => None,
    };
    let app_id = match f.opt_text("appId", 255) {
        Some(id) => {
            if !state.apps.is_empty() && !state.apps.iter().any(|a| a == id) {
                f.error(
                    "appId",
                    format!(
                        "unknown app; configured apps are: {}",
                        state.apps.join(", ")
                    ),
                );
            }
            Some(id.to_string())
        }
        None if f.raw("appId").is_some() => None,
        None => Some(
            state
                .apps
                .first()
                .cloned()
                .unwrap_or_else(|| "default".into()),
        ),
    };
    let locale = f.opt_str("locale");
    if let Some(l) = locale
        && let Err(m) = devices::validate_locale(l)
    {
        f.error("locale", m);
    }
    let app_version = f.opt_text("appVersion", 64);
    f.finish(|| {
        Some(NewDevice {
            platform: platform?,
            token: token?.to_string(),
            environment,
            app_id: app_id?,
            locale: locale.map(String::from),
            app_version: app_version.map(String::from),
        })
    })
}

/// Register or refresh this device's push token.
#[utoipa::path(post, path = "/v1/devices", tag = "devices",
    request_body(content = RegisterDeviceDoc, content_type = "application/json"),
    responses(
        (status = 201, description = "New to this user (or moved from another user)", body = Device),
        (status = 200, description = "Already this user's; refreshed", body = Device),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn register_device(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let new = parse_registration(&body, &state)?;
    let registered = state.store.upsert_device(&user.sub, &new).await?;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    tracing::info!(device_id = %registered.device.id, created = registered.created, "device registered");
    Ok((status, Json(registered.device)))
}

/// This user's devices, active and invalid, each with its `unseen` count.
#[utoipa::path(get, path = "/v1/devices", tag = "devices",
    responses((status = 200, description = "Each device carries `unseen`: updates after its last ack", body = DeviceList)),
    security(("bearer" = [])))]
async fn list_devices(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<DeviceList>, ApiError> {
    let mut devices = state.store.list_devices(&user.sub).await?;
    let unseen = state.store.unseen_counts(&user.sub).await?;
    for device in &mut devices {
        // Missing only when the device was deleted between the two reads: it has nothing unseen.
        device.unseen = Some(unseen.get(&device.id).copied().unwrap_or(0));
    }
    Ok(Json(DeviceList { devices }))
}

/// Remove one of this user's devices (e.g. on logout).
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = Uuid, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Not this user's device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn delete_device(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    // An unparseable id cannot be anyone's device: 404, exactly like someone else's.
    let not_found = || ApiError::NotFound("no such device".into());
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    if state.store.delete_device(&user.sub, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}
