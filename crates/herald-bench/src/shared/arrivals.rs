//! The latency benchmarks' harness: a reader of every partition of a topic
//! from its start (`read_committed`), on a thread of its own, noting when
//! each event id arrived; an open-loop schedule of writes; and
//! [`OpenLoop::run`], one measurement of a side with both.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use super::child::{RunningSide, SideResult};
use super::stats::percentile;
use super::topics::RunResources;

/// What the reader saw of one event.
pub struct Arrival {
    /// The record's `event_id` header.
    pub event_id: Uuid,
    /// When the reader received it (wall clock, comparable with the writer's).
    pub received: SystemTime,
    /// The record's Kafka timestamp, in ms since the epoch.
    pub create_time_ms: Option<i64>,
}

/// A running reader; it stops when [`ArrivalReader::finish`] is called or it
/// is dropped, however the benchmark ends.
pub struct ArrivalReader {
    arrived: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Arrival>>>,
}

impl ArrivalReader {
    /// Starts reading `topic` (`partitions` of them) in a fresh group of
    /// the run (only for `assign`: nothing is committed).
    pub fn start(
        brokers: &str,
        resources: &RunResources,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        let group = resources.name(&herald_test::unique_name("lat-reader"));
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            // Latency resolution: do not let a fetch wait long for data.
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the arrival reader")?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .context("assigning a partition")?;
        }
        consumer
            .assign(&assignment)
            .context("assigning the arrival reader")?;
        let arrived = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&arrived), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let Some(polled) = consumer.poll(Duration::from_millis(20)) else {
                    continue;
                };
                let received = SystemTime::now();
                let Ok(message) = polled else {
                    continue;
                };
                let event_id = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == herald::headers::EVENT_ID)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| Uuid::parse_str(v).ok())
                });
                if let Some(event_id) = event_id {
                    arrivals.push(Arrival {
                        event_id,
                        received,
                        create_time_ms: message.timestamp().to_millis(),
                    });
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            arrivals
        });
        Ok(Self {
            arrived,
            stop,
            thread: Some(thread),
        })
    }

    /// Events seen so far.
    pub fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::Relaxed)
    }

    /// Stops the reader; what it saw.
    pub async fn finish(mut self) -> anyhow::Result<Vec<Arrival>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("the reader already finished")?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining the arrival reader")?
            .map_err(|_| anyhow::anyhow!("the arrival reader panicked"))
    }
}

impl Drop for ArrivalReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Milliseconds from `from` to `to` (negative when `to` is earlier).
pub fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// The nearest-rank percentiles of a measurement's latencies (ms).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latencies {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
}

impl Latencies {
    /// The percentiles of `sorted` (ascending; NaN when empty).
    pub fn of(sorted: &[f64]) -> Self {
        let p = |q: f64| percentile(sorted, q).unwrap_or(f64::NAN);
        Self {
            p50_ms: p(50.0),
            p90_ms: p(90.0),
            p99_ms: p(99.0),
            max_ms: p(100.0),
        }
    }
}

/// What one open-loop measurement ([`OpenLoop::run`]) saw.
pub struct Measured<T> {
    /// What each write returned, in the order they finished.
    pub writes: Vec<T>,
    /// Seconds of the measured window.
    pub window: f64,
    /// What the reader received.
    pub arrivals: Vec<Arrival>,
    /// The side's own result.
    pub side: SideResult,
}

/// An open-loop schedule for the latency benchmarks: event `i` is due at
/// `i / rate`, whatever the system under test does. Nothing is measured
/// until the first event arrived and a warm-up passed; then `target` events
/// are measured.
pub struct OpenLoop {
    interval: Duration,
    started: tokio::time::Instant,
    warmup: Duration,
    target: u64,
    warm_until: Option<tokio::time::Instant>,
    measured_from: Option<(u64, tokio::time::Instant)>,
}

impl OpenLoop {
    /// `rate` events per second (at least 1), `warmup` after the first
    /// arrival, then `target` measured events.
    pub fn new(rate: u32, warmup: Duration, target: u64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))),
            started: tokio::time::Instant::now(),
            warmup,
            target,
            warm_until: None,
            measured_from: None,
        }
    }

    /// Waits until event number `written` is due. `Some(measured)`: write it
    /// (and whether it counts); `None`: the target is reached. Fails when
    /// nothing arrived within a minute (`what` names the missing part).
    pub async fn next(
        &mut self,
        written: u64,
        reader: &ArrivalReader,
        what: &str,
    ) -> anyhow::Result<Option<bool>> {
        let due = self.started + self.interval.mul_f64(written as f64);
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        match (self.warm_until, self.measured_from) {
            (None, _) if reader.arrived() > 0 => self.warm_until = Some(now + self.warmup),
            (None, _) if now.duration_since(self.started) > Duration::from_secs(60) => {
                anyhow::bail!("nothing reached the reader within 60 s (is {what} running?)");
            }
            (Some(until), None) if now >= until => self.measured_from = Some((written, now)),
            _ => {}
        }
        Ok(match self.measured_from {
            Some((first, _)) if written - first >= self.target => None,
            Some(_) => Some(true),
            None => Some(false),
        })
    }

    /// Seconds since measuring began (0 if it never did).
    fn measured_seconds(&self) -> f64 {
        self.measured_from
            .map(|(_, at)| at.elapsed().as_secs_f64())
            .unwrap_or_default()
    }

    /// Measures `side` (a child that runs until its stdin closes, `what`
    /// in errors): event after event on this schedule, `write(measured)`
    /// makes the task that writes it, until the target is measured; then
    /// waits up to `grace` + 30 s for `reader` to have every event, and
    /// stops the side and the reader.
    pub async fn run<T, F>(
        mut self,
        reader: ArrivalReader,
        side: RunningSide,
        what: &str,
        grace: Duration,
        mut write: impl FnMut(bool) -> anyhow::Result<F>,
    ) -> anyhow::Result<Measured<T>>
    where
        T: Send + 'static,
        F: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let mut written = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        let mut writes = Vec::new();
        while let Some(measured) = self.next(written, &reader, what).await? {
            tasks.spawn(write(measured)?);
            written += 1;
            // Reap finished writes as we go (bounded memory, early errors).
            while let Some(done) = tasks.try_join_next() {
                writes.push(done.context("a writer panicked")??);
            }
        }
        let window = self.measured_seconds();
        while let Some(done) = tasks.join_next().await {
            writes.push(done.context("a writer panicked")??);
        }
        let deadline = Instant::now() + grace + Duration::from_secs(30);
        while reader.arrived() < written && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let side = side.finish().await?;
        Ok(Measured {
            writes,
            window,
            arrivals: reader.finish().await?,
            side,
        })
    }
}
