//! The HTTP API (axum): orders, health, readiness, metrics, OpenAPI.
//!
//! [`router`] builds the whole app from its state, so tests drive it with
//! `tower::ServiceExt::oneshot` and no socket. The order routes need a
//! bearer token when [`AppState::auth`] says so (see [`auth`]); the
//! operations routes never do.

pub mod auth;
pub mod error;
pub mod json;
pub mod openapi;
pub mod orders;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald::TraceContext;
use herald_kafka::{ConsumerStats, Publisher};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use self::error::{error_response, ApiError};
use crate::domain::limits;
use crate::domain::Topics;
use crate::metrics::{Metrics, RouteLabels, CONTENT_TYPE};
use crate::store::Store;
use crate::supervisor::Health;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Topic names.
    pub topics: Topics,
    /// A Kafka client for readiness checks (`None`: Kafka is not checked).
    pub kafka: Option<Publisher>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The consumers running in this process, by name, for `/readyz`.
    pub consumers: Vec<(String, Arc<ConsumerStats>)>,
    /// The supervised parts of this process, for `/readyz`.
    pub health: Health,
    /// How the order routes authenticate callers.
    pub auth: auth::Auth,
}

/// How long a request may take, body upload included: slow clients get 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole API.
pub fn router(state: AppState) -> Router {
    with_ops(order_routes(&state), state, true)
}

/// The whole API but `/metrics`: the public port of an API process whose
/// metrics are served on `--metrics-addr` (by [`ops_router`]).
pub fn router_without_metrics(state: AppState) -> Router {
    with_ops(order_routes(&state), state, false)
}

/// Only `/healthz`, `/readyz`, `/metrics` and `/openapi.json`: the
/// metrics port of relay and worker processes (and of an API process
/// given `--metrics-addr`).
pub fn ops_router(state: AppState) -> Router {
    with_ops(Router::new(), state, true)
}

/// The order routes, behind the authentication middleware (a route
/// layer: unknown routes answer 404 without a token).
fn order_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/orders", post(orders::create).get(orders::list))
        .route("/orders/{id}", get(orders::get))
        .route("/orders/{id}/ship", post(orders::ship))
        .route("/orders/{id}/cancel", post(orders::cancel))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
}

fn with_ops(routes: Router<AppState>, state: AppState, with_metrics: bool) -> Router {
    let routes = routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let routes = if with_metrics {
        routes.route("/metrics", get(metrics))
    } else {
        routes
    };
    routes
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe_request,
        ))
        // One limit for every route, not only the JSON extractor's.
        .layer(RequestBodyLimitLayer::new(limits::MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        // Outermost, so that the answers the limit and the timeout layers
        // make themselves (a 413 for a too-long Content-Length, a 408) get
        // the error shape too, not tower-http's plain text.
        .layer(axum::middleware::from_fn(uniform_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::client(StatusCode::NOT_FOUND, "route_not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::client(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method",
    )
}

/// Responses made by layers (body limit, timeout, axum's own rejections)
/// get the API's error shape too.
async fn uniform_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the body is too large"),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        s if s.is_client_error() => ("bad_request", "the request was rejected"),
        _ => ("internal_error", "something went wrong on our side"),
    };
    error_response(status, code, message, &[])
}

/// The trace context of a request's work: what its outbox rows store, so the
/// events it writes continue its trace.
#[derive(Debug, Clone)]
pub struct RequestTrace(pub TraceContext);

/// Runs each request in an `http_request` span (OpenTelemetry HTTP server
/// conventions; its parent is the caller's `traceparent` when valid), gives
/// the handlers the request's trace context, and counts and times it.
async fn observe_request(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let caller = text("traceparent")
        .and_then(|parent| TraceContext::new(parent, text("tracestate").map(str::to_owned)).ok());
    if let Some(caller) = &caller {
        caller.adopt_as_parent(&span);
    }
    // OpenTelemetry's context for this span when it is on; otherwise a child
    // of the caller's context, or a new trace.
    let trace = TraceContext::of_span(&span).unwrap_or_else(|| {
        caller
            .as_ref()
            .map_or_else(TraceContext::new_root, TraceContext::child)
    });
    span.record("trace_id", trace.trace_id());
    request.extensions_mut().insert(RequestTrace(trace));

    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    state.metrics.observe_request(
        &RouteLabels {
            method,
            route,
            status,
        },
        started.elapsed(),
    );
    response
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let database = state.store.ping().await;
    let kafka = match &state.kafka {
        None => None,
        Some(publisher) => {
            let publisher = publisher.clone();
            let reachable = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                publisher
                    .producer()
                    .client()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            Some(reachable)
        }
    };
    // A consumer is ready once the group gave it partitions, or gave it
    // none because other members own them all (explicitly idle).
    let consumers: serde_json::Map<String, serde_json::Value> = state
        .consumers
        .iter()
        .map(|(name, stats)| {
            let status = if stats.breaker_open() > 0 {
                // Its handlers fail across keys: a dependency is down.
                "paused"
            } else if stats.assigned_partitions() > 0 {
                "assigned"
            } else if stats.rebalances() > 0 {
                "idle"
            } else {
                "joining"
            };
            (name.clone(), status.into())
        })
        .collect();
    let consumers_ready = consumers.values().all(|s| s == "assigned" || s == "idle");
    let components = state.health.snapshot();
    let ready = database && kafka.unwrap_or(true) && consumers_ready && state.health.all_running();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "database": database, "kafka": kafka, "consumers": consumers, "components": components },
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let (backlog, inbox, replays, parked) = tokio::join!(
        state.store.backlog(),
        state.store.inbox_rows(),
        state.store.dlq_replays(),
        state.store.parked(),
    );
    state
        .metrics
        .set_database_figures(backlog.as_ref(), inbox.as_deref(), replays, parked);
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}
