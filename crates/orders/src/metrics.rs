//! `/metrics` in the Prometheus text format, from the live counters of the
//! components running in this process. Labels are bounded: component names
//! only, never order or event ids.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::OutboxStatus;
use herald_kafka::processor::ProcessorStats;
use herald_kafka::{ConsumerStats, RelayStats};

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; 11],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The process's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    consumers: Mutex<Vec<(String, Arc<ConsumerStats>)>>,
    relays: Mutex<Vec<Arc<RelayStats>>>,
    processors: Mutex<Vec<Arc<ProcessorStats>>>,
    post_commit: Histogram,
}

impl Metrics {
    /// Adds a consumer's counters under `name` (e.g. `projection`).
    pub fn register_consumer(&self, name: &str, stats: Arc<ConsumerStats>) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_owned(), stats));
    }

    /// Adds a relay's counters.
    pub fn register_relay(&self, stats: Arc<RelayStats>) {
        self.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats);
    }

    /// Adds an exactly-once processor's counters.
    pub fn register_processor(&self, stats: Arc<ProcessorStats>) {
        self.processors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats);
    }

    /// Records the time from receiving `POST /orders` to its commit.
    pub fn observe_commit(&self, d: Duration) {
        self.post_commit.observe(d);
    }

    /// The Prometheus text.
    pub fn render(&self, outbox: Option<&OutboxStatus>) -> String {
        let mut out = String::new();
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        type Pick = fn(&ConsumerStats) -> &AtomicU64;
        let series: [(&str, &str, &str, Pick); 7] = [
            (
                "herald_consumer_records_consumed_total",
                "counter",
                "Records received from Kafka.",
                |s| &s.consumed,
            ),
            (
                "herald_consumer_records_handled_total",
                "counter",
                "Records handled successfully.",
                |s| &s.handled,
            ),
            (
                "herald_consumer_retries_total",
                "counter",
                "Handler retries after transient failures.",
                |s| &s.retried,
            ),
            (
                "herald_consumer_dead_lettered_total",
                "counter",
                "Records written to a dead-letter topic.",
                |s| &s.dead_lettered,
            ),
            (
                "herald_consumer_skipped_unknown_total",
                "counter",
                "Records of unknown event types skipped.",
                |s| &s.skipped_unknown,
            ),
            (
                "herald_consumer_commit_failures_total",
                "counter",
                "Offset commits that failed.",
                |s| &s.commit_failures,
            ),
            (
                "herald_consumer_in_flight_records",
                "gauge",
                "Records received and not finished.",
                |s| &s.in_flight,
            ),
        ];
        for (name, kind, help, pick) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (consumer, stats) in consumers.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{consumer=\"{consumer}\"}} {}",
                    pick(stats).load(Ordering::Relaxed)
                );
            }
        }
        drop(consumers);
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |pick: fn(&RelayStats) -> &AtomicU64| -> u64 {
            relays.iter().map(|r| pick(r).load(Ordering::Relaxed)).sum()
        };
        for (name, help, value) in [
            (
                "herald_relay_published_total",
                "Outbox records published to Kafka.",
                sum(|r| &r.published),
            ),
            (
                "herald_relay_batches_total",
                "Relay batches that published records.",
                sum(|r| &r.batches),
            ),
            (
                "herald_relay_publish_failures_total",
                "Deliveries that failed (retried later).",
                sum(|r| &r.publish_failures),
            ),
            (
                "herald_relay_store_failures_total",
                "Outbox store errors.",
                sum(|r| &r.store_failures),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        drop(relays);
        let processors = self.processors.lock().unwrap_or_else(|p| p.into_inner());
        let total = |pick: fn(&ProcessorStats) -> &AtomicU64| -> u64 {
            processors
                .iter()
                .map(|p| pick(p).load(Ordering::Relaxed))
                .sum()
        };
        for (name, help, value) in [
            (
                "herald_processor_transactions_committed_total",
                "Committed processor transactions.",
                total(|p| &p.committed),
            ),
            (
                "herald_processor_transactions_aborted_total",
                "Aborted processor transactions.",
                total(|p| &p.aborted),
            ),
            (
                "herald_processor_inputs_committed_total",
                "Inputs whose offsets were committed with their outputs.",
                total(|p| &p.committed_inputs),
            ),
            (
                "herald_processor_dead_lettered_total",
                "Poison inputs dead-lettered inside a transaction.",
                total(|p| &p.dead_lettered),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        drop(processors);
        if let Some(status) = outbox {
            let _ = writeln!(
                out,
                "# HELP herald_outbox_backlog Outbox rows not yet published.\n# TYPE herald_outbox_backlog gauge\nherald_outbox_backlog {}",
                status.backlog
            );
            let _ = writeln!(
                out,
                "# HELP herald_outbox_oldest_unpublished_age_seconds Age of the oldest unpublished outbox row.\n# TYPE herald_outbox_oldest_unpublished_age_seconds gauge\nherald_outbox_oldest_unpublished_age_seconds {}",
                status.oldest_unpublished_age().as_secs_f64()
            );
        }
        self.post_commit.render(
            &mut out,
            "orders_post_commit_seconds",
            "Time from receiving POST /orders to its database commit.",
        );
        out
    }
}
