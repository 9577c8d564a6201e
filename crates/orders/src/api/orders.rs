//! The order routes.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use herald::TraceContext;
use uuid::Uuid;

use super::error::ApiError;
use super::json::StrictJson;
use super::{AppState, RequestTrace};
use crate::db::{CreateOutcome, Transition, TransitionOutcome};
use crate::domain::{
    limits, parse_reason, CancelOrderRequest, CreateOrderRequest, NewOrder, OrderStatus,
};

/// The request's trace context, set by the API's request middleware (a new
/// trace if the handler runs without it).
fn trace_of(trace: Option<Extension<RequestTrace>>) -> TraceContext {
    trace.map_or_else(TraceContext::new_root, |Extension(RequestTrace(trace))| {
        trace
    })
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    if raw.len() > 36 {
        return Err(ApiError::client(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            "an order id is a UUID (36 characters)",
        ));
    }
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::client(
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
            "an order id is a UUID",
        )
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= limits::MAX_IDEMPOTENCY_KEY_LEN)
        .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::client(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    limits::MAX_IDEMPOTENCY_KEY_LEN
                ),
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// `POST /orders`
pub async fn create(
    State(state): State<AppState>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    StrictJson(request): StrictJson<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let order = NewOrder::parse(&request).map_err(ApiError::validation)?;
    let started = std::time::Instant::now();
    let trace = trace_of(trace);
    let outcome = state
        .store
        .create_order(&state.topics, &order, key.as_deref(), Some(trace))
        .await?;
    state.metrics.observe_commit(started.elapsed());
    Ok(match outcome {
        CreateOutcome::Created(view) => (StatusCode::CREATED, Json(view)).into_response(),
        CreateOutcome::Replayed { status, body } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            Json(body),
        )
            .into_response(),
        CreateOutcome::KeyReused => {
            return Err(ApiError::client(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
            ))
        }
    })
}

async fn transition(
    state: &AppState,
    raw_id: &str,
    trace: Option<Extension<RequestTrace>>,
    to: Transition,
) -> Result<Response, ApiError> {
    let order_id = parse_order_id(raw_id)?;
    let target = match to {
        Transition::Ship => OrderStatus::Shipped,
        Transition::Cancel(_) => OrderStatus::Cancelled,
    };
    match state
        .store
        .transition(&state.topics, order_id, to, Some(trace_of(trace)))
        .await?
    {
        TransitionOutcome::Done(view) => Ok((StatusCode::OK, Json(view)).into_response()),
        TransitionOutcome::NotFound => Err(ApiError::order_not_found()),
        TransitionOutcome::Forbidden(current) => Err(ApiError::client(
            StatusCode::CONFLICT,
            "invalid_transition",
            format!(
                "an order that is {} cannot become {}",
                current.as_str(),
                target.as_str()
            ),
        )),
    }
}

/// `POST /orders/{id}/ship`
pub async fn ship(
    State(state): State<AppState>,
    Path(id): Path<String>,
    trace: Option<Extension<RequestTrace>>,
) -> Result<Response, ApiError> {
    transition(&state, &id, trace, Transition::Ship).await
}

/// `POST /orders/{id}/cancel`
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    trace: Option<Extension<RequestTrace>>,
    StrictJson(request): StrictJson<CancelOrderRequest>,
) -> Result<Response, ApiError> {
    let reason = parse_reason(&request).map_err(ApiError::validation)?;
    transition(&state, &id, trace, Transition::Cancel(reason)).await
}

/// `GET /orders/{id}` — from the read model (eventually consistent).
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_order_id(&id)?;
    match state.store.get_view(order_id).await? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::client(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "no such order in the read model (a new order appears a moment after it is placed)",
        )),
    }
}

/// `GET /orders?customer_id=…&limit=…` — from the read model.
pub async fn list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    for name in params.keys() {
        if name != "customer_id" && name != "limit" {
            return Err(ApiError::client(
                StatusCode::BAD_REQUEST,
                "unknown_parameter",
                format!(
                    "unknown query parameter {:?}",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
    }
    let customer_id = params
        .get("customer_id")
        .and_then(|c| Uuid::parse_str(c).ok())
        .ok_or_else(|| {
            ApiError::client(
                StatusCode::BAD_REQUEST,
                "invalid_customer_id",
                "customer_id is required and is a UUID",
            )
        })?;
    let limit = match params.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| {
                ApiError::client(
                    StatusCode::BAD_REQUEST,
                    "invalid_limit",
                    "limit is an integer from 1 to 1000",
                )
            })?,
    };
    let orders = state.store.list_views(customer_id, limit).await?;
    Ok(Json(serde_json::json!({ "orders": orders })).into_response())
}
