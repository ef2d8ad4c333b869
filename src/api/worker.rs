//! `/v1/worker/*`: the lease API that lets out-of-process workers (any language) run
//! `external` kinds. Every call needs the `jobs:work` scope.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::input::{Fields, JsonObject};
use crate::auth::{AuthUser, Principal};
use crate::error::{ApiError, Problem};
use crate::jobs::{JobErrorInfo, Lease, Notification};

/// Scope every worker call needs.
const SCOPE: &str = "jobs:work";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(lease_jobs))
        .routes(routes!(heartbeat))
        .routes(routes!(progress))
        .routes(routes!(complete))
        .routes(routes!(fail))
}

/// A leased job.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeasedJob {
    /// Job id.
    pub tracking_id: Uuid,
    /// Kind.
    pub kind: String,
    /// Input.
    pub input: Value,
    /// Attempt number (1-based); may be passed back as `attempt` to fence calls.
    pub attempt: i32,
    /// The lease ends here unless extended by a heartbeat.
    pub lease_expires_at: DateTime<Utc>,
}

/// `POST /v1/worker/lease` answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LeaseAnswer {
    /// Possibly empty.
    pub jobs: Vec<LeasedJob>,
}

/// Heartbeat answer.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatAnswer {
    /// The new end of the lease.
    pub lease_expires_at: DateTime<Utc>,
}

fn owner(user: &Principal) -> String {
    format!("worker:{}", user.sub)
}

fn lost() -> ApiError {
    ApiError::Conflict(
        "this worker does not hold a lease on the job (expired, finished or never leased)".into(),
    )
}

/// 204 when the write happened under the lease, else 409.
fn held(written: bool) -> Result<StatusCode, ApiError> {
    if written {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(lost())
    }
}

fn job_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| lost())
}

/// Read the optional `attempt` fence from a body.
fn lease_for(user: &Principal, id: Uuid, f: &mut Fields<'_>) -> Lease {
    Lease {
        job_id: id,
        owner: owner(user),
        attempt: f
            .opt_int("attempt", 1..=i64::from(i32::MAX))
            .map(|a| a as i32),
    }
}

/// Lease up to `max` jobs of external `kinds`, waiting up to `waitSeconds` for work.
#[utoipa::path(post, path = "/v1/worker/lease", tag = "worker",
    request_body(content = Object, content_type = "application/json",
        description = "`{\"kinds\": [..], \"max\": 1-100 (default 1), \"leaseSeconds\": 5-3600 (default 60), \"waitSeconds\": 0-30 (default 0)}`"),
    responses((status = 200, body = LeaseAnswer), (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = ["jobs:work"])))]
async fn lease_jobs(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: JsonObject,
) -> Result<Json<LeaseAnswer>, ApiError> {
    user.require_scope(SCOPE)?;
    let mut f = Fields::new(&body.0);
    let kinds: Vec<String> = match f.raw("kinds") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut kinds = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(k) if state.kinds.get(k).is_some_and(|c| c.is_external()) => {
                        kinds.push(k.to_string())
                    }
                    _ => f.error("kinds", format!("{item} is not a configured external kind")),
                }
            }
            kinds
        }
        _ => {
            f.error("kinds", "must be a non-empty array of external kinds");
            Vec::new()
        }
    };
    let max = f.opt_int("max", 1..=100).unwrap_or(1);
    let lease_secs = f.opt_int("leaseSeconds", 5..=3600).unwrap_or(60);
    let wait_secs = f.opt_int("waitSeconds", 0..=30).unwrap_or(0);
    f.finish(|| Some(()))?;

    let lease = Duration::from_secs(lease_secs as u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs as u64);
    loop {
        // Register interest before looking, so work committed in between is not missed.
        let notified = state.wakeup.external.notified();
        let jobs = state
            .store
            .claim_jobs(&kinds, max, &owner(&user), lease)
            .await?;
        if !jobs.is_empty() || tokio::time::Instant::now() >= deadline {
            let jobs = jobs
                .into_iter()
                .map(|j| LeasedJob {
                    tracking_id: j.id,
                    kind: j.kind,
                    input: j.input,
                    attempt: j.attempt,
                    lease_expires_at: j.lease_expires_at,
                })
                .collect();
            return Ok(Json(LeaseAnswer { jobs }));
        }
        // Woken by a submission (or NOTIFY); the poll bound covers retries becoming due.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            notified,
        )
        .await;
    }
}

/// Extend the lease (`{"leaseSeconds": 5-3600, "attempt": n}`, both optional).
#[utoipa::path(post, path = "/v1/worker/jobs/{id}/heartbeat", tag = "worker",
    request_body(content = Object, content_type = "application/json", description = "Optional"),
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses((status = 200, body = HeartbeatAnswer), (status = 409, description = "Lease not held", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = ["jobs:work"])))]
async fn heartbeat(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<HeartbeatAnswer>, ApiError> {
    user.require_scope(SCOPE)?;
    let id = job_id(&id)?;
    // The body is optional here: an empty one means "defaults".
    let map = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(ApiError::Unprocessable(
                    "the request body must be a JSON object".into(),
                ));
            }
            Err(err) => return Err(ApiError::BadRequest(format!("malformed JSON: {err}"))),
        }
    };
    let mut f = Fields::new(&map);
    let lease = lease_for(&user, id, &mut f);
    let secs = f.opt_int("leaseSeconds", 5..=3600).unwrap_or(60);
    f.finish(|| Some(()))?;
    let until = state
        .store
        .heartbeat_job(&lease, Duration::from_secs(secs as u64))
        .await?
        .ok_or_else(lost)?;
    Ok(Json(HeartbeatAnswer {
        lease_expires_at: until,
    }))
}

/// Report progress (`{"progress": 0-100, "data": {...}}`): becomes a `job.processing` update.
#[utoipa::path(post, path = "/v1/worker/jobs/{id}/progress", tag = "worker",
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses((status = 204, description = "Recorded"), (status = 409, description = "Lease not held", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = ["jobs:work"])))]
async fn progress(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    body: JsonObject,
) -> Result<StatusCode, ApiError> {
    user.require_scope(SCOPE)?;
    let id = job_id(&id)?;
    let mut f = Fields::new(&body.0);
    let lease = lease_for(&user, id, &mut f);
    let percent = f.opt_int("progress", 0..=100);
    if f.raw("progress").is_none() {
        f.error("progress", "is required");
    }
    let data = f.opt_object("data").map(|m| Value::Object(m.clone()));
    let percent = f.finish(|| percent)?;
    held(
        state
            .store
            .progress_job(&lease, percent as i32, data)
            .await?,
    )
}

/// Complete (`{"result": {...}, "notification": {"title", "body"}}`).
#[utoipa::path(post, path = "/v1/worker/jobs/{id}/complete", tag = "worker",
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses((status = 204, description = "Completed"), (status = 409, description = "Lease not held", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = ["jobs:work"])))]
async fn complete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    body: JsonObject,
) -> Result<StatusCode, ApiError> {
    user.require_scope(SCOPE)?;
    let id = job_id(&id)?;
    let mut f = Fields::new(&body.0);
    let lease = lease_for(&user, id, &mut f);
    let result = f.raw("result").cloned().unwrap_or(Value::Null);
    let notification = f.nested("notification", |n| Notification {
        title: n.opt_text("title", 256).map(String::from),
        body: n.opt_text("body", 2048).map(String::from),
    });
    f.finish(|| Some(()))?;
    held(
        state
            .store
            .complete_job(&lease, &result, notification.as_ref())
            .await?,
    )
}

/// Fail (`{"error": {"code", "message"}, "retryable": bool}`); retryable failures back off and
/// return to the queue while attempts remain.
#[utoipa::path(post, path = "/v1/worker/jobs/{id}/fail", tag = "worker",
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses((status = 204, description = "Recorded"), (status = 409, description = "Lease not held", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = ["jobs:work"])))]
async fn fail(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    body: JsonObject,
) -> Result<StatusCode, ApiError> {
    user.require_scope(SCOPE)?;
    let id = job_id(&id)?;
    let mut f = Fields::new(&body.0);
    let lease = lease_for(&user, id, &mut f);
    if f.raw("error").is_none() {
        f.error("error", "is required");
    }
    let error = f.nested("error", |e| {
        let code = e.req_str("code").map(String::from);
        let message = e
            .opt_text("message", 4096)
            .map(String::from)
            .unwrap_or_default();
        code.map(|code| JobErrorInfo { code, message })
    });
    let retryable = f.opt_bool("retryable").unwrap_or(false);
    let error = f.finish(|| error.flatten())?;
    // Without an `attempt` in the body the first-retry ceiling applies.
    let retry_at = retryable.then(|| {
        Utc::now()
            + chrono::Duration::from_std(state.backoff.delay(lease.attempt.unwrap_or(1)))
                .unwrap_or_default()
    });
    if state.store.fail_job(&lease, &error, retry_at).await? {
        if retryable {
            state.wakeup.job_available("");
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(lost())
    }
}
