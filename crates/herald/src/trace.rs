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

/// The bridge to OpenTelemetry, for the spans herald emits through `tracing`.
///
/// Every function here is a no-op (or returns `None`) when the process has no
/// `tracing-opentelemetry` layer installed: there is then no trace to join,
/// and the W3C context travels through the records unchanged.
impl TraceContext {
    /// This context as a remote OpenTelemetry parent.
    pub fn to_otel(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        // The fields were validated as lower hex of the right lengths.
        let trace_id = TraceId::from_hex(self.trace_id()).unwrap_or(TraceId::INVALID);
        let span_id = SpanId::from_hex(self.parent_span_id()).unwrap_or(SpanId::INVALID);
        let flags = u8::from_str_radix(&self.traceparent[53..55], 16).unwrap_or(0);
        let state = self
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
        opentelemetry::Context::new().with_remote_span_context(context)
    }

    /// The W3C form of an OpenTelemetry span context; `None` when it is not
    /// valid (no OpenTelemetry layer, or a disabled span).
    pub fn from_otel(context: &opentelemetry::trace::SpanContext) -> Option<Self> {
        if !context.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        );
        let state = context.trace_state().header();
        Self::new(traceparent, Some(state)).ok()
    }

    /// The context of `span` as OpenTelemetry sees it: what a record written
    /// inside `span` should carry so that its consumers join the trace as
    /// children of `span`.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        Self::from_otel(span.context().span().span_context())
    }

    /// Makes this context the OpenTelemetry parent of `span` (which must not
    /// have been entered yet): the span joins the producer's trace.
    pub fn adopt_as_parent(&self, span: &tracing::Span) {
        // Fails only when no OpenTelemetry layer is installed, and then
        // there is no trace to join.
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(span, self.to_otel());
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

    #[test]
    fn round_trips_through_opentelemetry() {
        use opentelemetry::trace::TraceContextExt;
        let ctx = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61rcWkgMzE".into()),
        )
        .expect("valid");
        let otel = ctx.to_otel();
        let back = TraceContext::from_otel(otel.span().span_context()).expect("valid");
        assert_eq!(back, ctx);
        assert!(
            TraceContext::from_otel(&opentelemetry::trace::SpanContext::empty_context()).is_none()
        );
    }

    #[test]
    fn a_span_has_no_context_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("no subscriber");
        assert!(TraceContext::of_span(&span).is_none());
        TraceContext::new_root().adopt_as_parent(&span);
    }
}
