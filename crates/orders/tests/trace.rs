//! One order, one trace: the API's span, the outbox enqueue, the relay's
//! publish span, and both consumers' spans share one trace id, each the
//! child of the hop before it (real Kafka and PostgreSQL; an in-memory span
//! exporter behind the service's own subscriber). Its own test binary: the
//! subscriber is process-global.

#[path = "service/support.rs"]
#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orders::cli::LogFormat;
use tracing_subscriber::EnvFilter;

use crate::support::*;

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_api_relay_and_consumer_spans_share_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = orders::telemetry::subscriber(
        LogFormat::Text,
        EnvFilter::new("warn,herald=info,herald_kafka=info,herald_postgres=info,orders=info"),
        Some(provider.tracer("herald-tests")),
    );
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let Some(p) = pipeline().await else { return };
    let client = reqwest::Client::new();
    let id = p.create_order(&client, &valid_order()).await;
    eventually(
        &client,
        &format!("{}/orders/{id}", p.base),
        "the order in the read model",
        |b| b["last_event_type"] == "OrderCreated",
    )
    .await;
    // Both consumers and the processor have the event once their spans
    // ended: wait for the spans rather than for time.
    let topic = p.config.topics.events.clone();
    let process = format!("{topic} process");
    let spans = herald_test::poll_until("the order's spans", Duration::from_secs(60), async || {
        provider.force_flush().expect("flush");
        let spans = exporter.get_finished_spans().expect("spans");
        // Of the order's trace (the processor's transaction span has the
        // same name but a trace of its own): projection, notifications and
        // the fulfillment processor's input, and both consumers' handlers.
        let order_trace = spans
            .iter()
            .find(|s| s.name == "POST /orders")
            .map(|api| api.span_context.trace_id());
        let in_trace = |name: &dyn Fn(&str) -> bool| {
            spans
                .iter()
                .filter(|s| Some(s.span_context.trace_id()) == order_trace && name(&s.name))
                .count()
        };
        if in_trace(&|n| n == process) >= 3 && in_trace(&|n| n.ends_with(" handle")) >= 2 {
            Ok(spans)
        } else {
            Err(format!("{:?}", names(&spans)))
        }
    })
    .await;
    p.stop().await;

    let api = spans
        .iter()
        .find(|s| s.name == "POST /orders")
        .unwrap_or_else(|| panic!("no API span in {:?}", names(&spans)));
    let trace_id = api.span_context.trace_id();
    let of_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect();
    let by_id: HashMap<SpanId, &SpanData> = of_trace
        .iter()
        .map(|s| (s.span_context.span_id(), *s))
        .collect();
    let parent_name = |span: &SpanData| {
        by_id
            .get(&span.parent_span_id)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|| format!("<{} not in the trace>", span.parent_span_id))
    };

    let enqueue = of_trace
        .iter()
        .find(|s| s.name == "outbox enqueue")
        .unwrap_or_else(|| panic!("no outbox span in the trace: {:?}", names(&spans)));
    assert_eq!(parent_name(enqueue), "POST /orders");

    let publish_name = format!("{topic} publish");
    let publish = of_trace
        .iter()
        .find(|s| s.name == publish_name.as_str())
        .unwrap_or_else(|| panic!("no relay span in the trace: {:?}", names(&spans)));
    // The outbox row stored the request's context; the relay's span is its
    // child although it ran in another task, after the commit.
    assert_eq!(parent_name(publish), "POST /orders");

    let consumers: Vec<&&SpanData> = of_trace
        .iter()
        .filter(|s| s.name == process.as_str())
        .collect();
    assert!(
        consumers.len() >= 3,
        "projection, notifications and fulfillment in the trace: {:?}",
        names(&spans)
    );
    for consume in &consumers {
        assert_eq!(
            parent_name(consume),
            publish_name,
            "a consume span's parent"
        );
    }
    let handlers: Vec<&&SpanData> = of_trace
        .iter()
        .filter(|s| s.name.ends_with(" handle"))
        .collect();
    assert!(
        handlers.len() >= 2,
        "handler spans of both consumers: {:?}",
        names(&spans)
    );
    for handle in handlers {
        assert_eq!(parent_name(handle), process, "a handle span's parent");
    }
}
