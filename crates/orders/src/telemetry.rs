//! Logs and traces of the service process.
//!
//! - Logs: human-readable by default, JSON lines with `--log-format json`,
//!   level from `RUST_LOG` (default `info,rdkafka=warn,sqlx=warn`). A JSON
//!   line carries `trace_id` (and `span_id` when OpenTelemetry is on) of the
//!   span it was written in.
//! - Traces: exported over OTLP/HTTP (protobuf) when the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set, with `OTEL_SERVICE_NAME` (default `orders`) and the exporter's
//!   other standard variables. Unset, no OpenTelemetry layer is installed at
//!   all: spans cost what `tracing` spans cost, and nothing more. The layer
//!   has its own filter ([`OTEL_FILTER`]): herald's per-record spans are at
//!   debug level, off for the logs at `info`, on for the traces.

use std::fmt;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::cli::LogFormat;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,rdkafka=warn,sqlx=warn";

/// What the OpenTelemetry layer records, whatever `RUST_LOG` says: herald's
/// per-record spans (consume, handle, relay publish, processor input) are at
/// debug level so that log formatting at `info` does not pay for them, and a
/// trace needs them.
pub const OTEL_FILTER: &str =
    "info,herald=debug,herald_kafka=debug,herald_postgres=debug,herald_sqlite=debug";

/// The environment variables that switch OTLP export on.
const OTLP_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans not
/// yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("flushing traces at exit failed: {error}");
            }
        }
    }
}

/// Installs the process's subscriber. Call it before the tokio runtime
/// starts: the OTLP exporter's blocking HTTP client must not be created
/// inside one.
pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(DEFAULT_FILTER))
        .context("RUST_LOG: not a valid filter")?;
    let provider = otlp_provider()?;
    let tracer = provider.as_ref().map(|p| p.tracer("herald"));
    tracing::subscriber::set_global_default(subscriber(format, filter, tracer))
        .context("installing the log subscriber")?;
    Ok(Telemetry { provider })
}

/// The subscriber [`init`] installs: logs in `format` filtered by `filter`,
/// plus OpenTelemetry spans through `tracer` when there is one. Tests build
/// it with an in-memory exporter's tracer.
pub fn subscriber(
    format: LogFormat,
    filter: EnvFilter,
    tracer: Option<Tracer>,
) -> impl Subscriber + Send + Sync {
    subscriber_writing_to(format, filter, tracer, std::io::stdout)
}

/// [`subscriber`] with its log lines written to `writer`.
pub fn subscriber_writing_to<W>(
    format: LogFormat,
    filter: EnvFilter,
    tracer: Option<Tracer>,
    writer: W,
) -> impl Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let logs: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new(OTEL_FILTER))
    });
    tracing_subscriber::registry().with(logs).with(otel)
}

fn otlp_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let configured = OTLP_ENDPOINT_VARIABLES
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: building the OTLP/HTTP span exporter")?;
    // OTEL_SERVICE_NAME, when set, wins over the default (the builder reads
    // it and OTEL_RESOURCE_ATTRIBUTES).
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name("orders").build()
    };
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's
/// fields (`message` included), `span` (the innermost span's name), and the
/// trace ids: OpenTelemetry's when it is on, else the `trace_id` field the
/// nearest herald span recorded from the record or request it works on.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_owned()));
        event.record(&mut JsonVisitor(&mut line));

        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), Value::String(span.name().to_owned()));
        }
        // The innermost span's OpenTelemetry ids when that layer is on,
        // else the `trace_id` a herald span recorded.
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let extensions = span.extensions();
                if let Some(otel) = extensions.get::<OtelData>() {
                    if let (Some(trace), Some(span)) = (otel.trace_id(), otel.span_id()) {
                        return Some((trace.to_string().into(), Some(span.to_string())));
                    }
                }
                let fields = extensions.get::<FormattedFields<N>>()?;
                let parsed: Map<String, Value> = serde_json::from_str(fields).ok()?;
                Some((parsed.get("trace_id")?.clone(), None))
            })
        });
        if let Some((trace_id, span_id)) = ids {
            line.insert("trace_id".into(), trace_id);
            if let Some(span_id) = span_id {
                line.insert("span_id".into(), span_id.into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into a JSON object.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry_sdk::trace::InMemorySpanExporter;

    use super::*;

    /// Log lines collected in memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Lines {
        fn json(&self) -> Vec<Map<String, Value>> {
            let bytes = self.0.lock().expect("lines").clone();
            String::from_utf8(bytes)
                .expect("utf-8")
                .lines()
                .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
                .collect()
        }
    }

    #[test]
    fn json_lines_carry_opentelemetry_ids_when_it_is_on() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let lines = Lines::default();
        let subscriber = subscriber_writing_to(
            LogFormat::Json,
            EnvFilter::new("info"),
            Some(provider.tracer("test")),
            lines.clone(),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::info!(order = 7, "inside");
        });
        let spans = exporter.get_finished_spans().expect("spans");
        let work = spans.iter().find(|s| s.name == "work").expect("span");
        let line = lines.json().pop().expect("one line");
        assert_eq!(line["message"], "inside");
        assert_eq!(line["order"], 7);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"], "work");
        assert_eq!(
            line["trace_id"],
            work.span_context.trace_id().to_string().as_str()
        );
        assert_eq!(
            line["span_id"],
            work.span_context.span_id().to_string().as_str()
        );
    }

    #[test]
    fn json_lines_carry_the_recorded_trace_id_without_opentelemetry() {
        let lines = Lines::default();
        let subscriber =
            subscriber_writing_to(LogFormat::Json, EnvFilter::new("info"), None, lines.clone());
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("consume", trace_id);
            let _outer = outer.enter();
            let inner = tracing::info_span!("handle");
            let _inner = inner.enter();
            tracing::warn!("retrying");
        });
        let line = lines.json().pop().expect("one line");
        assert_eq!(line["trace_id"], trace_id);
        assert_eq!(line["span"], "handle");
        assert!(line.get("span_id").is_none());
    }
}
