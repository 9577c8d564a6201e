//! W3C trace context (<https://www.w3.org/TR/trace-context/>) as carried in
//! the `traceparent` and `tracestate` headers of every record.

use std::fmt;

/// A validated `traceparent` plus the optional `tracestate` that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

/// Why a `traceparent` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {reason}")]
pub struct InvalidTraceparent {
    /// The rejected value.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl TraceContext {
    /// Parses a `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`).
    pub fn new(
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Result<Self, InvalidTraceparent> {
        let traceparent = traceparent.into();
        let invalid = |reason| InvalidTraceparent {
            value: traceparent.clone(),
            reason,
        };
        let parts: Vec<&str> = traceparent.split('-').collect();
        let [version, trace_id, span_id, flags] = parts.as_slice() else {
            return Err(invalid("expected four dash-separated fields"));
        };
        let is_lower_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !is_lower_hex(version, 2) || *version == "ff" {
            return Err(invalid("bad version"));
        }
        if !is_lower_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return Err(invalid("bad trace id"));
        }
        if !is_lower_hex(span_id, 16) || span_id.bytes().all(|b| b == b'0') {
            return Err(invalid("bad parent id"));
        }
        if !is_lower_hex(flags, 2) {
            return Err(invalid("bad flags"));
        }
        Ok(Self {
            traceparent,
            tracestate: tracestate.filter(|s| !s.is_empty()),
        })
    }

    /// A new trace (sampled), for an operation that arrived without one.
    pub fn new_root() -> Self {
        let trace_id: u128 = rand::random::<u128>().max(1);
        Self::with_ids(trace_id, None)
    }

    /// A context for a new span inside this trace: same trace id and flags,
    /// a fresh span id.
    pub fn child(&self) -> Self {
        let trace_id = u128::from_str_radix(self.trace_id(), 16).unwrap_or(1);
        let flags = &self.traceparent[53..55];
        let mut child = Self::with_ids(trace_id, self.tracestate.clone());
        child.traceparent.replace_range(53..55, flags);
        child
    }

    fn with_ids(trace_id: u128, tracestate: Option<String>) -> Self {
        let span_id: u64 = rand::random::<u64>().max(1);
        Self {
            traceparent: format!("00-{trace_id:032x}-{span_id:016x}-01"),
            tracestate,
        }
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, when there is one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The 16-hex-digit id of the parent span.
    pub fn parent_span_id(&self) -> &str {
        &self.traceparent[36..52]
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example() {
        let ctx = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61rcWkgMzE".into()),
        )
        .expect("valid");
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id(), "00f067aa0ba902b7");
        assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn children_share_the_trace_and_get_new_span_ids() {
        let root = TraceContext::new_root();
        assert!(TraceContext::new(root.traceparent(), None).is_ok(), "valid");
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.parent_span_id(), root.parent_span_id());
        assert!(TraceContext::new(child.traceparent(), None).is_ok());
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::new(bad, None).is_err(), "{bad:?} accepted");
        }
    }
}
