//! A strict JSON body extractor whose rejections use the API's error shape:
//! content type, size, UTF-8, syntax, unknown and duplicate fields, types
//! and ranges are all checked before a handler runs.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::domain::{limits, FieldError};

/// `T` parsed from a JSON body, strictly.
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let charset_ok = parts.all(|p| {
        let p = p.trim().to_ascii_lowercase();
        !p.starts_with("charset=") || p == "charset=utf-8" || p == "charset=\"utf-8\""
    });
    essence.eq_ignore_ascii_case("application/json") && charset_ok
}

/// Parses `bytes` as `T` with the API's error semantics.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::client(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            format!("the body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::client(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    format!("the body is not valid JSON: {inner}"),
                )
            }
            _ => ApiError::Client {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_body",
                message: "the body does not match the expected schema".to_owned(),
                details: vec![FieldError {
                    field: if path == "." { String::new() } else { path },
                    message: strip_position(&inner.to_string()),
                }],
            },
        }
    })?;
    deserializer.end().map_err(|e| {
        ApiError::client(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("trailing characters after the JSON value: {e}"),
        )
    })?;
    if let Some(path) = nul_path(text) {
        // PostgreSQL cannot store NUL in text: refuse it here, as a client
        // error, instead of failing (500) at the database.
        return Err(ApiError::Client {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_character",
            message: "strings must not contain NUL (\\u0000)".to_owned(),
            details: vec![FieldError {
                field: path,
                message: "contains NUL".to_owned(),
            }],
        });
    }
    Ok(value)
}

/// The path of the first string (key or value) containing NUL, if any.
fn nul_path(text: &str) -> Option<String> {
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Some(path.to_owned()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if k.contains('\0') {
                    Some(here)
                } else {
                    walk(v, &here)
                }
            }),
            _ => None,
        }
    }
    // Cheap test first: a NUL is either a raw byte or the \u0000 escape.
    if !text.contains('\0') && !text.contains("\\u0000") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    walk(&value, "")
}

/// serde's messages end with " at line 1 column 42": useful in a log, noise
/// in a field detail.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::client(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the body is larger than {} bytes", limits::MAX_BODY_BYTES),
                    )
                } else {
                    ApiError::client(
                        StatusCode::BAD_REQUEST,
                        "unreadable_body",
                        "the body could not be read",
                    )
                }
            })?;
        parse(&bytes).map(StrictJson)
    }
}
