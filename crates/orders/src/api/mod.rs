//! The HTTP API (axum): orders, health, readiness, metrics, OpenAPI.
//!
//! [`router`] builds the whole app from its state, so tests drive it with
//! `tower::ServiceExt::oneshot` and no socket.

pub mod error;
pub mod json;
pub mod openapi;
pub mod orders;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_kafka::Publisher;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use self::error::{error_response, ApiError};
use crate::db::Topics;
use crate::domain::limits;
use crate::metrics::Metrics;
use crate::store::Store;

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
}

/// How long a request may take, body upload included: slow clients get 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole API.
pub fn router(state: AppState) -> Router {
    with_ops(
        Router::new()
            .route("/orders", post(orders::create).get(orders::list))
            .route("/orders/{id}", get(orders::get))
            .route("/orders/{id}/ship", post(orders::ship))
            .route("/orders/{id}/cancel", post(orders::cancel)),
        state,
    )
}

/// Only `/healthz`, `/readyz`, `/metrics` and `/openapi.json`: the
/// metrics port of relay and worker processes.
pub fn ops_router(state: AppState) -> Router {
    with_ops(Router::new(), state)
}

fn with_ops(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(uniform_errors))
        // One limit for every route, not only the JSON extractor's.
        .layer(RequestBodyLimitLayer::new(limits::MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
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
    let ready = database && kafka.unwrap_or(true);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "database": database, "kafka": kafka },
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let backlog = state.store.backlog().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(backlog.as_ref()),
    )
        .into_response()
}
