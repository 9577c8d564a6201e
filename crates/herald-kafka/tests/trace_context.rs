//! The consumer's span for a record joins the producer's trace: its parent is
//! the span named by the record's `traceparent` (in-memory span exporter).
//!
//! A test binary of its own: tracing caches per call site whether anyone
//! listens, and with the other runtime tests' consumers running in the same
//! process on other threads, this test's thread-scoped subscriber sometimes
//! saw no span at all (once in a full run, never alone).

use std::time::Duration;

use herald::{Envelope, TraceContext};
use herald_kafka::{Consumer, ConsumerConfig, OutgoingRecord, RecordInfo, Router};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

// The runtime tests' helpers; this binary uses a few of them.
#[allow(dead_code)]
#[path = "runtime/support.rs"]
mod support;

use support::*;

#[tokio::test(flavor = "current_thread")]
async fn the_consume_span_continues_the_producers_trace() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("herald-tests")));
    // Scoped to this thread: the consumer carries it to its poll thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let topic = kafka.topic("traced", 1).await;
    let producer_span = TraceContext::new_root();
    let event = steps(1, 1).remove(0);
    let envelope = Envelope::encode(&event, "/tests")
        .expect("encode")
        .with_trace(Some(producer_span.clone()));
    publisher(&kafka)
        .publish_record(&OutgoingRecord::from_envelope(topic.name(), &envelope))
        .await
        .expect("published");

    let seen = Seen::default();
    let router = Router::new().handle("traced", {
        let seen = seen.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let seen = seen.clone();
            async move {
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let config = ConsumerConfig::new(
        kafka.brokers(),
        herald_test::unique_name("traced"),
        [topic.name()],
    );
    let consumer = Consumer::new(config, router).expect("consumer");
    run_until(
        consumer,
        "the record handled",
        Duration::from_secs(60),
        || seen.len() == 1,
    )
    .await;
    provider.force_flush().expect("flush");

    let spans = exporter.get_finished_spans().expect("spans");
    let consume = spans
        .iter()
        .find(|s| s.name.ends_with(" process"))
        .unwrap_or_else(|| {
            panic!(
                "no consume span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        consume.span_context.trace_id().to_string(),
        producer_span.trace_id()
    );
    assert_eq!(
        consume.parent_span_id.to_string(),
        producer_span.parent_span_id()
    );
    assert!(consume
        .attributes
        .iter()
        .any(|kv| kv.key.as_str() == "messaging.system" && kv.value.as_str() == "kafka"));
}
