//! The order routes. Each takes the request's [`Access`] (see
//! [`super::auth`] for who may do what).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use herald::TraceContext;
use uuid::Uuid;

use super::auth::{Access, SCOPE_SHIP};
use super::error::ApiError;
use super::json::StrictJson;
use super::{AppState, RequestTrace};
use crate::domain::{
    limits, parse_reason, CancelOrderRequest, CreateOrderRequest, NewOrder, OrderStatus,
};
use crate::domain::{CreateOutcome, Transition, TransitionOutcome};

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

/// The answer to acting for another customer (creating or listing).
fn forbidden(what: &str) -> ApiError {
    ApiError::client(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{what}: the customer_id is not the token's subject"),
    )
}

/// `POST /orders`
pub async fn create(
    State(state): State<AppState>,
    access: Access,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    StrictJson(request): StrictJson<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let order = NewOrder::parse(&request).map_err(ApiError::validation)?;
    if !access.may_act_for(order.customer_id) {
        return Err(forbidden("a customer places orders for itself only"));
    }
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

/// Moves `raw_id` along; `owner`: only that customer's order (another's
/// answers 404, as a missing one does).
async fn transition(
    state: &AppState,
    raw_id: &str,
    owner: Option<Uuid>,
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
        .transition(&state.topics, order_id, owner, to, Some(trace_of(trace)))
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

/// `POST /orders/{id}/ship` — a back-office action: needs the scope
/// `orders:ship`, and a shipper ships any customer's order.
pub async fn ship(
    State(state): State<AppState>,
    access: Access,
    Path(id): Path<String>,
    trace: Option<Extension<RequestTrace>>,
) -> Result<Response, ApiError> {
    access.require_scope(SCOPE_SHIP)?;
    transition(&state, &id, None, trace, Transition::Ship).await
}

/// `POST /orders/{id}/cancel` — the caller's own orders only.
pub async fn cancel(
    State(state): State<AppState>,
    access: Access,
    Path(id): Path<String>,
    trace: Option<Extension<RequestTrace>>,
    StrictJson(request): StrictJson<CancelOrderRequest>,
) -> Result<Response, ApiError> {
    let reason = parse_reason(&request).map_err(ApiError::validation)?;
    transition(
        &state,
        &id,
        access.owner_filter(),
        trace,
        Transition::Cancel(reason),
    )
    .await
}

/// `GET /orders/{id}` — from the read model (eventually consistent); the
/// caller's own orders only (another's is 404, as a missing one).
pub async fn get(
    State(state): State<AppState>,
    access: Access,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_order_id(&id)?;
    match state.store.get_view(order_id).await? {
        Some(view) if access.may_act_for(view.customer_id) => Ok(Json(view).into_response()),
        _ => Err(ApiError::client(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "no such order in the read model (a new order appears a moment after it is placed)",
        )),
    }
}

/// `GET /orders?customer_id=…&limit=…` — from the read model. With a
/// token, `customer_id` defaults to the caller and may not be another
/// customer (403).
pub async fn list(
    State(state): State<AppState>,
    access: Access,
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
    let customer_id = match (params.get("customer_id"), access.customer()) {
        (None, Some(caller)) => caller,
        (raw, _) => raw.and_then(|c| Uuid::parse_str(c).ok()).ok_or_else(|| {
            ApiError::client(
                StatusCode::BAD_REQUEST,
                "invalid_customer_id",
                "customer_id is required (without a token) and is a UUID",
            )
        })?,
    };
    if !access.may_act_for(customer_id) {
        return Err(forbidden("a customer lists its own orders only"));
    }
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
