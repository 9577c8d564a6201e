//! How a handler reports failure: the runtime retries a transient error with
//! backoff and dead-letters a permanent one at once.

use std::error::Error as StdError;
use std::fmt;

/// The class of a failure, written to the `dlq.error_class` header and used
/// as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Worth retrying: a timeout, a lost connection, a lock conflict.
    Transient,
    /// Retrying cannot help: a business rule rejects the event.
    Permanent,
    /// The record could not be decoded (bad bytes, bad headers).
    Decode,
    /// The record's `event_type` is not one this consumer knows.
    UnknownType,
    /// The record did not fail: an earlier record of its key did, and it
    /// waits (parked) behind that one's dead letter, to keep the key's order.
    Parked,
}

impl ErrorClass {
    /// The stable name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Decode => "decode",
            ErrorClass::UnknownType => "unknown_type",
            ErrorClass::Parked => "parked",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error a handler returns.
#[derive(Debug)]
pub struct HandlerError {
    class: ErrorClass,
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying with backoff.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            class: ErrorClass::Transient,
            source: source.into(),
        }
    }

    /// A failure that retrying cannot fix: the record is dead-lettered at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            source: source.into(),
        }
    }

    /// Whether the runtime should retry.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    /// The class of this failure.
    pub fn class(&self) -> ErrorClass {
        self.class
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failure: {}", self.class, self.source)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.source.as_ref())
    }
}

/// The message of a caught panic (`catch_unwind`'s payload), for the error
/// that reports it.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
