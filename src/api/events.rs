//! `POST /v1/events`: back-end services append their own updates (e.g. `order.shipped`) to a
//! user's log, where they are pushed and synced like job updates. Needs `events:publish`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use super::input::{Fields, JsonObject};
use crate::auth::AuthUser;
use crate::error::{ApiError, Problem};
use crate::jobs::Notification;
use crate::updates::NewUpdate;

/// Scope a publisher needs.
const SCOPE: &str = "events:publish";

/// Types with this prefix are Herald's own job updates; a service must not imitate them.
const RESERVED_PREFIX: &str = "job.";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish_event))
}

/// The 202 answer to a published event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Published {
    /// The update's id.
    pub id: Uuid,
    /// Its place in the user's log.
    pub seq: i64,
}

/// Event body (documentation only: the body is read field by field for exact errors).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = PublishEvent)]
struct PublishEventDoc {
    /// The user whose log receives the event (their tokens' `sub`), 1–255 characters.
    #[schema(rename = "userId")]
    user_id: String,
    /// 1–100 characters of `[A-Za-z0-9._-]`, e.g. `order.shipped`; `job.` is reserved.
    #[schema(rename = "type")]
    kind: String,
    /// The publisher's reference (e.g. a job id), a UUID.
    #[schema(rename = "trackingId")]
    tracking_id: Option<Uuid>,
    /// Details for the app (a JSON object).
    data: Option<Value>,
    /// What the push shows (`title` ≤ 256, `body` ≤ 2048 characters); without it the push is
    /// a background one that makes the app sync.
    notification: Option<Notification>,
}

/// Why `kind` is not an acceptable event type, if it is not.
fn type_error(kind: &str) -> Option<&'static str> {
    if !kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("may contain only letters, digits, '.', '_' and '-'");
    }
    // Only ASCII is left, so bytes are characters.
    if kind.is_empty() || kind.len() > 100 {
        return Some("must be 1 to 100 characters");
    }
    // Case-insensitive so `JOB.completed` cannot pass for a job update either.
    if kind
        .get(..RESERVED_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX))
    {
        return Some("the \"job.\" prefix is reserved for Herald's own job updates");
    }
    None
}

fn parse_event(body: &JsonObject) -> Result<(String, NewUpdate), ApiError> {
    let mut f = Fields::new(&body.0);
    let user_id = f.req_text("userId", 255);
    let kind = f.req_str("type");
    if let Some(k) = kind
        && let Some(why) = type_error(k)
    {
        f.error("type", why);
    }
    let tracking_id = match f.opt_str("trackingId") {
        None => None,
        Some(raw) => match Uuid::parse_str(raw) {
            Ok(id) => Some(id),
            Err(_) => {
                f.error("trackingId", "must be a UUID");
                None
            }
        },
    };
    let data = f.opt_object("data").map(|m| Value::Object(m.clone()));
    let notification = f.nested("notification", |n| Notification {
        title: n.opt_text("title", 256).map(String::from),
        body: n.opt_text("body", 2048).map(String::from),
    });
    // An empty notification would be an alert with nothing to show: send a background push.
    let notification = notification.filter(|n| n.title.is_some() || n.body.is_some());
    f.finish(|| {
        let update = NewUpdate {
            kind: kind?.to_string(),
            tracking_id,
            // Status belongs to job updates; an event has none.
            status: None,
            data,
            notification,
        };
        Some((user_id?.to_string(), update))
    })
}

/// Append an event to a user's log; it is pushed and synced like any other update.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(content = PublishEventDoc, content_type = "application/json"),
    responses(
        (status = 202, description = "Appended to the user's log", body = Published),
        (status = 403, description = "The token lacks `events:publish`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["events:publish"])))]
async fn publish_event(
    State(state): State<AppState>,
    AuthUser(principal): AuthUser,
    body: Result<JsonObject, ApiError>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    // The scope is checked before the body is judged: a caller without it learns nothing else.
    principal.require_scope(SCOPE)?;
    let (user_id, update) = parse_event(&body?)?;
    let appended = state.events.submit((user_id, update)).await?;
    metrics::counter!("herald_events_published_total").increment(1);
    tracing::info!(update_id = %appended.id, seq = appended.seq, r#type = %appended.kind, "event published");
    Ok((
        StatusCode::ACCEPTED,
        Json(Published {
            id: appended.id,
            seq: appended.seq,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::type_error;

    #[test]
    fn event_types() {
        for ok in [
            "order.shipped",
            "a",
            "A-b_c.9",
            "jobs.done",
            "job",
            &"x".repeat(100),
        ] {
            assert_eq!(type_error(ok), None, "{ok}");
        }
        for bad in ["", "has space", "ünï", "a/b", &"x".repeat(101)] {
            assert!(type_error(bad).is_some(), "{bad:?}");
        }
        for reserved in ["job.completed", "JOB.x", "job."] {
            assert!(type_error(reserved).is_some_and(|m| m.contains("reserved")));
        }
    }
}
