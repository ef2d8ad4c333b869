//! `/v1/updates`: the sync an app runs on launch to catch up on what it missed, and the ack
//! that records what each device has seen.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::input::{Fields, JsonObject};
use super::jobs::parse_limit;
use crate::auth::AuthUser;
use crate::error::{ApiError, FieldError, Problem};
use crate::store::Acked;
use crate::updates::Update;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_updates))
        .routes(routes!(ack_updates))
}

/// Page size when the app names none.
const DEFAULT_LIMIT: i64 = 100;

/// Sync query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SyncQuery {
    /// The highest `seq` the app has seen (its cursor); default 0, i.e. from the start.
    after: Option<String>,
    /// 1–500, default 100.
    limit: Option<String>,
}

/// `GET /v1/updates` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncPage {
    /// The caller's updates after `after`, ascending `seq`.
    pub updates: Vec<Update>,
    /// The highest `seq` in `updates`, or `after` when there are none: the next cursor.
    pub last_seq: i64,
    /// True when more updates follow; call again with `after=lastSeq`.
    pub has_more: bool,
}

/// Ack body (documentation only: the body is read field by field for exact errors).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = AckUpdates)]
struct AckDoc {
    /// One of the caller's devices.
    #[schema(rename = "deviceId")]
    device_id: Uuid,
    /// The device has seen every update up to this `seq` (≥ 0); a lower value than the one
    /// already recorded is ignored.
    seq: i64,
}

/// Parse `after`: a non-negative integer, default 0.
fn parse_after(after: Option<&str>) -> Result<i64, FieldError> {
    match after {
        None => Ok(0),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(n),
            _ => Err(FieldError::new("after", "must be a non-negative integer")),
        },
    }
}

/// This user's updates after `after`, ascending: what an app calls on launch to catch up.
#[utoipa::path(get, path = "/v1/updates", tag = "updates", params(SyncQuery),
    responses(
        (status = 200, body = SyncPage),
        (status = 422, description = "Invalid `after` or `limit`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn list_updates(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<SyncQuery>, QueryRejection>,
) -> Result<Json<SyncPage>, ApiError> {
    // axum's own rejection is plain text; every error of this API is a problem document.
    let Query(query) =
        query.map_err(|_| ApiError::BadRequest("the query string is malformed".into()))?;
    // Both parameters are checked before answering, so one 422 names every bad one.
    let mut errors = Vec::new();
    let after = parse_after(query.after.as_deref())
        .map_err(|e| errors.push(e))
        .ok();
    let limit = match parse_limit(query.limit.as_deref(), DEFAULT_LIMIT) {
        Ok(limit) => Some(limit),
        Err(ApiError::Validation(mut more)) => {
            errors.append(&mut more);
            None
        }
        Err(other) => return Err(other),
    };
    let (Some(after), Some(limit)) = (after, limit) else {
        return Err(ApiError::Validation(errors));
    };
    // One extra row tells whether another page follows without a count query.
    let mut updates = state
        .store
        .list_updates(&user.sub, after, limit + 1)
        .await?;
    let has_more = updates.len() as i64 > limit;
    updates.truncate(limit as usize);
    let last_seq = updates.last().map_or(after, |u| u.seq);
    Ok(Json(SyncPage {
        updates,
        last_seq,
        has_more,
    }))
}

/// Record that one of the caller's devices has seen every update up to `seq`.
#[utoipa::path(post, path = "/v1/updates/ack", tag = "updates",
    request_body(content = AckDoc, content_type = "application/json"),
    responses(
        (status = 204, description = "Recorded (a seq lower than the recorded one changes nothing)"),
        (status = 404, description = "Not one of the caller's devices", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field, or a seq beyond the caller's newest update (a cursor there would hide updates appended later)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn ack_updates(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: JsonObject,
) -> Result<StatusCode, ApiError> {
    let mut f = Fields::new(&body.0);
    let device_id = f.req_str("deviceId");
    let seq = match f.raw("seq") {
        None => {
            f.error("seq", "is required");
            None
        }
        Some(value) => match value.as_i64() {
            Some(n) if n >= 0 => Some(n),
            _ => {
                f.error("seq", "must be a non-negative integer");
                None
            }
        },
    };
    let (device_id, seq) = f.finish(|| Some((device_id?, seq?)))?;
    // An id that is not a UUID cannot be anyone's device: 404, exactly like someone else's.
    let not_found = || ApiError::NotFound("no such device".into());
    let device_id = Uuid::parse_str(device_id).map_err(|_| not_found())?;
    match state.store.ack_updates(&user.sub, device_id, seq).await? {
        Acked::Recorded => {
            tracing::debug!(device_id = %device_id, seq, "updates acknowledged");
            Ok(StatusCode::NO_CONTENT)
        }
        Acked::NoSuchDevice => Err(not_found()),
        Acked::Beyond(last) => Err(ApiError::field(
            "seq",
            format!("is beyond your newest update ({last})"),
        )),
    }
}
