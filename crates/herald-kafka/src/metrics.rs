//! Prometheus metrics of herald's Kafka components, for a
//! [`prometheus_client::registry::Registry`] the service owns.
//!
//! Each component keeps its figures in a stats value ([`crate::ConsumerStats`],
//! [`crate::RelayStats`], [`crate::PublisherStats`],
//! [`crate::processor::ProcessorStats`]) that is also a
//! [`Collector`](prometheus_client::collector::Collector): register it with
//! `registry.register_collector(Box::new(stats))` (through a sub-registry
//! with a `consumer="…"` label when a process runs several consumers). There
//! is no global registry.
//!
//! Label sets are bounded: topics, partitions, handler names, the event types
//! a router knows (others are `other`), error classes. Never event or
//! aggregate ids.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds, in seconds, of every latency histogram herald exports:
/// 0.5 ms to 10 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram over [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// Labels of a handler's duration histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    /// The handler's registered name.
    pub handler: String,
    /// The event type it handled.
    pub event_type: String,
}

/// Labels of the dead-letter counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// The topic the record came from.
    pub topic: String,
    /// Its event type when the router knows it, `other` when it does not,
    /// `undecodable` when the record had none.
    pub event_type: String,
    /// The [`herald::ErrorClass`] that sent it there.
    pub error_class: String,
}

/// Labels of per-partition gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic.
    pub topic: String,
    /// The partition, in decimal.
    pub partition: String,
}

/// Writes one counter whose value is read at scrape time (for collectors
/// outside herald too, so every help text is written the same way).
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    encode_metric(encoder, name, help, &ConstCounter::new(value))
}

/// Writes one gauge whose value is read at scrape time.
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    encode_metric(encoder, name, help, &ConstGauge::new(value))
}

/// Writes one metric (or family) under `name`.
pub fn encode_metric(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: &(impl EncodeMetric + ?Sized),
) -> fmt::Result {
    // The encoder ends the help text with a period of its own.
    let help = help.trim_end_matches('.');
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

/// Declares a component's stats value: counters and gauges kept in
/// `AtomicU64`s (written by the component, `pub(crate)`), a reading method
/// per figure for users, `Default`, and `encode_figures`, which writes every
/// figure that names a metric. Fields that are Prometheus metrics already
/// (histograms, families) go in the `metrics` part with their initial value
/// and are written by the same call. The component's `Collector` calls
/// `encode_figures` and adds what is computed at scrape time.
///
/// Each figure is `name: counter("metric", "help")`, `name: gauge("metric",
/// "help")`, or `name: internal` (read by methods, not exported as is).
macro_rules! stats {
    (
        $(#[$meta:meta])*
        pub struct $stats:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident: $kind:ident $(($metric:literal, $help:literal))?,
            )*
        }
        $(metrics {
            $(
                $(#[doc = $mdoc:literal])*
                $mfield:ident: $mty:ty = $minit:expr => ($mmetric:literal, $mhelp:literal),
            )*
        })?
    ) => {
        $(#[$meta])*
        #[derive(Debug)]
        pub struct $stats {
            $(
                $(#[doc = $doc])*
                pub(crate) $field: ::std::sync::atomic::AtomicU64,
            )*
            $($(
                $(#[doc = $mdoc])*
                pub $mfield: $mty,
            )*)?
        }

        impl Default for $stats {
            fn default() -> Self {
                Self {
                    $($field: ::std::sync::atomic::AtomicU64::new(0),)*
                    $($($mfield: $minit,)*)?
                }
            }
        }

        impl $stats {
            $(
                $(#[doc = $doc])*
                pub fn $field(&self) -> u64 {
                    self.$field.load(::std::sync::atomic::Ordering::Relaxed)
                }
            )*

            /// Writes every declared figure that names a metric.
            #[allow(dead_code)]
            fn encode_figures(
                &self,
                encoder: &mut ::prometheus_client::encoding::DescriptorEncoder<'_>,
            ) -> ::std::fmt::Result {
                $($crate::metrics::stats!(@encode encoder, self.$field(), $kind $(($metric, $help))?);)*
                $($(crate::metrics::encode_metric(encoder, $mmetric, $mhelp, &self.$mfield)?;)*)?
                Ok(())
            }
        }
    };
    (@encode $encoder:ident, $value:expr, counter($metric:literal, $help:literal)) => {
        crate::metrics::encode_counter($encoder, $metric, $help, $value)?
    };
    (@encode $encoder:ident, $value:expr, gauge($metric:literal, $help:literal)) => {
        crate::metrics::encode_gauge($encoder, $metric, $help, $value)?
    };
    (@encode $encoder:ident, $value:expr, internal) => {};
}
pub(crate) use stats;

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
            encode_counter(&mut encoder, "things", "Things done.", 3)?;
            encode_gauge(&mut encoder, "level", "A level.", 7)?;
            let histogram = latency_histogram();
            histogram.observe(0.003);
            encode_metric(&mut encoder, "took_seconds", "Time taken.", &histogram)
        }
    }

    #[test]
    fn collectors_render_counters_gauges_and_histograms() {
        let mut registry = Registry::default();
        registry
            .sub_registry_with_label(("consumer".into(), "projection".into()))
            .register_collector(Box::new(Fixed));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("things_total{consumer=\"projection\"} 3"),
            "{text}"
        );
        assert!(text.contains("level{consumer=\"projection\"} 7"), "{text}");
        assert!(
            text.contains("took_seconds_bucket{consumer=\"projection\",le=\"0.005\"} 1"),
            "{text}"
        );
    }
}
