//! The HTTP API: one router per resource, assembled here with the cross-cutting layers
//! (request id, tracing, metrics, body limit, problem responses for everything).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, Request};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::config::KindConfig;
use crate::error::{ApiError, problem_response};
use crate::queue::{Backoff, Wakeup};
use crate::store::Store;
use crate::store::{EventIntake, JobIntake};

mod devices;
mod events;
pub mod input;
pub mod jobs;
mod ops;
mod updates;
mod worker;

/// Everything a handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Bearer token verification.
    pub auth: Authenticator,
    /// Configured app ids; the first is the default.
    pub apps: Arc<[String]>,
    /// Prometheus exposition.
    pub metrics: PrometheusHandle,
    /// The generated OpenAPI document, served as is.
    pub openapi: Arc<String>,
    /// Configured job kinds.
    pub kinds: Arc<BTreeMap<String, KindConfig>>,
    /// Whether callback URLs may target private addresses.
    pub allow_private_targets: bool,
    /// Wakes workers when work is committed.
    pub wakeup: Arc<Wakeup>,
    /// Retry policy for externally reported failures.
    pub backoff: Backoff,
    /// Group commit of submissions.
    pub intake: JobIntake,
    /// Group commit of published events.
    pub events: EventIntake,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Herald", description = "Self-hosted mobile push backend: devices, jobs, updates, events.", version = "1"),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// All routes with their OpenAPI description; the document is derived from these same routes.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(ops::router())
        .merge(devices::router())
        .merge(jobs::router())
        .merge(worker::router())
        .merge(updates::router())
        .merge(events::router())
}

/// The OpenAPI 3.1 document for the routes, as JSON.
pub fn openapi_json() -> String {
    let (_, api) = routes().split_for_parts();
    api.to_pretty_json().unwrap_or_else(|_| "{}".into())
}

/// Build the complete application router.
pub fn router(state: AppState, body_limit: usize, request_timeout: Duration) -> Router {
    let (router, _) = routes().split_for_parts();
    let request_id = HeaderName::from_static("x-request-id");
    let timeout_layer = ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(
            |_: axum::BoxError| async { ApiError::Unavailable("the request took too long".into()) },
        ))
        .timeout(request_timeout);
    router
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .layer(axum::middleware::from_fn(crate::telemetry::record_http_metrics))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([axum::http::header::AUTHORIZATION]))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("-");
                    // The path only: query strings can carry `access_token`.
                    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)))
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(CatchPanicLayer::custom(|_| panic_response()))
                .layer(timeout_layer),
        )
}

fn panic_response() -> Response {
    tracing::error!("handler panicked");
    problem_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        Some("an internal error occurred".into()),
        Vec::new(),
    )
}

/// Convert any `ApiError` result into a response (used by middleware).
pub fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}
