//! `/v1/jobs`: submit work (202 + tracking id once committed), poll it, list it, cancel it.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::input::{Fields, JsonObject};
use crate::auth::AuthUser;
use crate::error::{ApiError, Problem};
use crate::jobs::{CancelOutcome, CreateOutcome, Job, JobStatus, NewJob, Notify};

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit_job, list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
}

/// The 202 answer to a submission.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// The job id; poll `statusUrl` or wait for the push.
    pub tracking_id: Uuid,
    /// Always `pending`.
    pub status: JobStatus,
    /// `/v1/jobs/{trackingId}`.
    pub status_url: String,
    /// Submission time.
    pub created_at: DateTime<Utc>,
}

/// Submission body (documentation only: the body is read field by field for exact errors).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = SubmitJob)]
struct SubmitJobDoc {
    /// A configured kind, e.g. `report.generate`.
    kind: String,
    /// Handler input (a JSON object; default `{}`).
    input: Option<Value>,
    /// Receives a signed POST for every update of the job.
    #[schema(rename = "callbackUrl")]
    callback_url: Option<String>,
    /// What the completion push says.
    notify: Option<Notify>,
}

/// A page of jobs.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Longest idempotency key.
const MAX_KEY: usize = 255;

fn accepted_response(job: &Job, replayed: bool) -> Response {
    let url = format!("/v1/jobs/{}", job.tracking_id);
    let body = Accepted {
        tracking_id: job.tracking_id,
        status: JobStatus::Pending,
        status_url: url.clone(),
        created_at: job.created_at,
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn parse_submission(
    state: &AppState,
    user: &str,
    headers: &HeaderMap,
    body: &JsonObject,
) -> Result<NewJob, ApiError> {
    let mut f = Fields::new(&body.0);
    let kind = f.req_str("kind");
    let max_attempts = match kind.and_then(|k| state.kinds.get(k)) {
        Some(config) => Some(config.max_attempts),
        None => {
            if let Some(k) = kind {
                let known: Vec<&str> = state.kinds.keys().map(String::as_str).collect();
                f.error(
                    "kind",
                    format!(
                        "unknown kind {k:?}; configured kinds are: {}",
                        known.join(", ")
                    ),
                );
            }
            None
        }
    };
    let input = match f.raw("input") {
        None => Some(Value::Object(Default::default())),
        Some(Value::Object(map)) => Some(Value::Object(map.clone())),
        Some(_) => {
            f.error("input", "must be a JSON object");
            None
        }
    };
    let callback_url = f.opt_str("callbackUrl");
    if let Some(url) = callback_url
        && let Err(why) = crate::webhooks::check_target(url, state.allow_private_targets)
    {
        f.error("callbackUrl", why);
    }
    let notify = f.nested("notify", |n| {
        let title = n.opt_text("title", 256).map(String::from);
        let body = n.opt_text("body", 2048).map(String::from);
        let silent = n.opt_bool("silent").unwrap_or(false);
        Notify {
            title,
            body,
            silent,
        }
    });
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= MAX_KEY => Some(k.to_string()),
            _ => {
                f.error(
                    "Idempotency-Key",
                    "must be 1 to 255 visible ASCII characters",
                );
                None
            }
        },
    };
    // The hash covers the whole body, so "same key, different body" is detectable.
    let request_hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&body.0).unwrap_or_default(),
    ));
    f.finish(|| {
        Some(NewJob {
            user_id: user.to_string(),
            kind: kind?.to_string(),
            input: input?,
            callback_url: callback_url.map(String::from),
            notify,
            idempotency_key: key,
            request_hash,
            max_attempts: max_attempts?,
        })
    })
}

/// Submit a job: answered 202 once it is durably committed.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content = SubmitJobDoc, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the original answer for the same body (kept as long as the job)")),
    responses(
        (status = 202, description = "Committed; processing starts shortly", body = Accepted,
         headers(("Location" = String, description = "/v1/jobs/{id}"), ("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 422, description = "Invalid field, unknown kind, or idempotency key reused with another body", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn submit_job(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let new = parse_submission(&state, &user.sub, &headers, &body)?;
    match state.intake.submit(new).await? {
        CreateOutcome::Created(job) => {
            state.wakeup.job_available(&job.kind);
            metrics::counter!("herald_jobs_submitted_total", "kind" => job.kind.clone())
                .increment(1);
            tracing::info!(tracking_id = %job.tracking_id, kind = %job.kind, "job accepted");
            Ok(accepted_response(&job, false))
        }
        CreateOutcome::Replayed(job) => Ok(accepted_response(&job, true)),
        CreateOutcome::KeyReused => Err(ApiError::field(
            "Idempotency-Key",
            "this key was already used with a different request body",
        )),
    }
}

fn parse_job_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound("no such job".into()))
}

/// One job: the polling fallback.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses((status = 200, body = Job), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn get_job(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_job_id(&id)?;
    state
        .store
        .get_job(&user.sub, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no such job".into()))
}

/// List query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this status.
    status: Option<String>,
    /// 1–500, default 50.
    limit: Option<String>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

fn encode_cursor(id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<Uuid> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    Uuid::from_slice(&bytes).ok()
}

/// Parse a `limit` query parameter (1–500).
pub fn parse_limit(limit: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match limit {
        None => Ok(default),
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=500).contains(&n) => Ok(n),
            _ => Err(ApiError::field("limit", "must be an integer from 1 to 500")),
        },
    }
}

/// This user's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = JobPage), (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn list_jobs(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::field(
                "status",
                "must be pending, processing, completed, failed or canceled",
            )
        })?),
    };
    let limit = parse_limit(query.limit.as_deref(), 50)?;
    let before = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor this API issued"))?,
        ),
    };
    let mut jobs = state
        .store
        .list_jobs(&user.sub, status, before, limit + 1)
        .await?;
    let next_cursor = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| encode_cursor(j.tracking_id))
    } else {
        None
    };
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// Cancel a pending or processing job.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Tracking id")),
    responses(
        (status = 200, description = "Canceled", body = Job),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn cancel_job(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_job_id(&id)?;
    match state.store.cancel_job(&user.sub, id).await? {
        CancelOutcome::Canceled(job) => {
            tracing::info!(tracking_id = %id, "job canceled");
            Ok(Json(job))
        }
        CancelOutcome::Finished(job) => Err(ApiError::Conflict(format!(
            "the job is already {}",
            job.status.as_str()
        ))),
        CancelOutcome::NotFound => Err(ApiError::NotFound("no such job".into())),
    }
}
