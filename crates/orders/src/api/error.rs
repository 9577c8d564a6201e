//! The API's one error shape:
//! `{"error": {"code": "...", "message": "...", "details": [{"field", "message"}]}}`.
//!
//! Every 4xx says what was wrong in a stable, machine-readable `code`; a 5xx
//! says only that something failed — the cause goes to the log, never to
//! the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::domain::FieldError;

/// An API failure.
#[derive(Debug)]
pub enum ApiError {
    /// A 4xx with a code and a message.
    Client {
        /// HTTP status.
        status: StatusCode,
        /// Stable machine-readable code.
        code: &'static str,
        /// Human-readable explanation.
        message: String,
        /// Per-field problems.
        details: Vec<FieldError>,
    },
    /// Something failed on our side: logged, shown as a bare 500.
    Internal(anyhow::Error),
    /// A dependency is down: 503.
    Unavailable(String),
    /// A 401 or 403 of the bearer-token authentication, with its
    /// `WWW-Authenticate` challenge.
    Auth(super::auth::Rejection),
}

impl ApiError {
    /// A 4xx without field details.
    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Client {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// A 422 listing every invalid field.
    pub fn validation(details: Vec<FieldError>) -> Self {
        ApiError::Client {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            message: "the request has invalid fields".to_owned(),
            details,
        }
    }

    /// A 404 for an order that does not exist.
    pub fn order_not_found() -> Self {
        ApiError::client(StatusCode::NOT_FOUND, "order_not_found", "no such order")
    }
}

impl<E: Into<anyhow::Error>> From<E> for ApiError {
    fn from(error: E) -> Self {
        let error = error.into();
        if is_unavailable(&error) {
            ApiError::Unavailable(format!("{error:#}"))
        } else {
            ApiError::Internal(error)
        }
    }
}

/// Whether `error` says the database cannot be reached (see
/// [`herald_postgres::is_connection_lost`]), which a client should retry,
/// rather than a defect.
fn is_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(herald_postgres::is_connection_lost)
            // An I/O error wrapped in another error (a store error whose
            // cause is the socket).
            || cause.downcast_ref::<std::io::Error>().is_some()
    })
}

/// What a 503 asks the client to wait before retrying, in seconds.
pub const RETRY_AFTER_SECONDS: u32 = 2;

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    details: &'a [FieldError],
}

/// Renders the error shape.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    details: &[FieldError],
) -> Response {
    (
        status,
        Json(Body {
            error: Inner {
                code,
                message,
                details,
            },
        }),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Client {
                status,
                code,
                message,
                details,
            } => error_response(status, code, &message, &details),
            ApiError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "something went wrong on our side; it has been logged",
                    &[],
                )
            }
            ApiError::Unavailable(what) => {
                tracing::warn!(%what, "dependency unavailable");
                let mut response = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the service is temporarily unavailable; retry later",
                    &[],
                );
                response.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
                );
                response
            }
            ApiError::Auth(rejection) => rejection.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(error: impl Into<anyhow::Error>) -> StatusCode {
        ApiError::from(error).into_response().status()
    }

    #[test]
    fn a_lost_database_is_503_and_a_defect_is_500() {
        // What sqlx returns when the connection closes while it asks for TLS.
        let closed_during_tls =
            sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        assert_eq!(status(closed_during_tls), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            status(anyhow::Error::new(sqlx::Error::PoolTimedOut).context("creating an order")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(sqlx::Error::RowNotFound),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
