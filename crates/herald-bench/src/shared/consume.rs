//! The consumer runtime as the benchmarks that read run it: handlers count
//! what they handled on a [`Probe`], and [`consume`] runs the consumer until
//! the probe saw every record, timed from the first to the last.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context};
use herald_kafka::Consumer;

use super::child::SideResult;

/// What a handler sees: when the first and the target-th record came.
pub struct Probe {
    target: u64,
    handled: AtomicU64,
    /// When the first record was handled.
    pub first: OnceLock<Instant>,
    last: OnceLock<Instant>,
    done: tokio::sync::Notify,
}

impl Probe {
    /// A probe waiting for `target` records.
    pub fn new(target: u64) -> Self {
        Self {
            target,
            handled: AtomicU64::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        }
    }

    /// Counts one handled record.
    pub fn hit(&self) {
        self.first.get_or_init(Instant::now);
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            let _ = self.last.set(Instant::now());
            self.done.notify_one();
        }
    }
}

/// Runs `consumer` until its handlers counted `records` on `probe`, then
/// stops it. The result is timed from the first handled record to the
/// last (joining the group is not measured: it is `startup_seconds`), with
/// the runtime's counters.
pub async fn consume(
    consumer: Consumer,
    probe: &Probe,
    records: u64,
) -> anyhow::Result<SideResult> {
    let stats = consumer.stats();
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stop_rx.await;
    }));
    probe.done.notified().await;
    let _ = stop_tx.send(());
    running.await.context("the consumer task panicked")??;
    let (Some(first), Some(last)) = (probe.first.get(), probe.last.get()) else {
        bail!("the handler never saw the last record");
    };
    Ok(
        SideResult::finish(records, last.duration_since(*first).as_secs_f64())?
            .with(
                "startup_seconds",
                first.duration_since(started).as_secs_f64(),
            )
            .with("consumed", stats.consumed() as f64)
            .with("handled", stats.handled() as f64)
            .with("dead_lettered", stats.dead_lettered() as f64)
            .with("commit_failures", stats.commit_failures() as f64),
    )
}
