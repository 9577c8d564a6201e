//! `herald-bench consumer`: herald's consumer runtime (a [`Router`] with one
//! no-op handler, keys in parallel) against a bare rdkafka `BaseConsumer`
//! loop that stores each record's offset (`enable.auto.offset.store=false`,
//! `store_offset_from_message` per record, auto commit every second like the
//! runtime's commit interval). Both read the same pre-produced topic (herald
//! envelopes, so the runtime decodes real events) from the start, each in a
//! fresh consumer group with the same librdkafka consumer defaults
//! ([`CONSUMER_DEFAULTS`]). Each side is timed from its first record to its
//! last: joining the group is not measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use futures::StreamExt;
use herald_kafka::consumer::CONSUMER_DEFAULTS;
use herald_kafka::{Consumer, ConsumerConfig, Publisher, PublisherConfig, RecordInfo, Router};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::SideSpec as AnySide;
use crate::shared::child::{run_side as run_child, SideResult};
use crate::shared::report::{Comparison, RoundResults};
use crate::shared::stats::{per_second, rate, round_order, Side, Span};
use crate::shared::topics::RunResources;
use crate::shared::workload::{BenchEvent, Workload, SOURCE};
use crate::shared::{progress, CommonArgs};

/// The ratio herald's consumer runtime should reach.
pub const GOAL: f64 = 0.8;

/// Flags of `herald-bench consumer`.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    /// Keys the runtime handles in parallel (`ConsumerConfig::concurrency`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Records received but unfinished before the runtime pauses fetching
    /// (`ConsumerConfig::max_in_flight`).
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// What herald's runtime is compared with: `bare` (a bare rdkafka loop,
    /// the goal), `bare-decode` (that loop also decoding each
    /// record's envelope and typed event, the work any typed handler needs:
    /// what is left of the gap is the runtime's own cost), or
    /// `uninstrumented` (the runtime itself with tracing and detailed
    /// metrics off, against it with a subscriber at `info` and metrics on:
    /// the cost of instrumentation, goal ≥ 0.95).
    #[arg(long, value_enum, default_value_t = Baseline::Bare)]
    pub baseline: Baseline,
}

/// The baseline side of `herald-bench consumer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Baseline {
    /// A bare rdkafka consumer loop.
    Bare,
    /// The bare loop, also decoding each record as a typed handler needs.
    BareDecode,
    /// herald's runtime without tracing subscriber and detailed metrics.
    Uninstrumented,
}

/// The ratio instrumented ÷ uninstrumented should reach.
pub const INSTRUMENTATION_GOAL: f64 = 0.95;

/// One side of the consumer benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    side: Side,
    brokers: String,
    topic: String,
    group: String,
    records: u64,
    concurrency: usize,
    max_in_flight: usize,
    /// `None`: the runtime's defaults, no subscriber (against the bare
    /// loop); `Some(on)`: tracing at info and detailed metrics on or off.
    instrumented: Option<bool>,
    /// Whether the bare loop decodes each record (`--baseline bare-decode`).
    decode: bool,
}

/// Runs the rounds and returns the comparison.
pub async fn run(args: &ConsumerArgs, resources: &RunResources) -> anyhow::Result<Comparison> {
    let common = &args.common;
    common.validate()?;
    let topic = resources.topic("consume", common.partitions).await?;
    let produced = pre_produce(common, &topic).await?;
    progress(format!(
        "consumer: pre-produced {} records to {topic} at {} rec/s",
        common.records,
        per_second(produced)
    ));
    let mut setup = common.setup();
    setup.insert("concurrency".into(), json!(args.concurrency));
    setup.insert("max_in_flight".into(), json!(args.max_in_flight));
    setup.insert("baseline".into(), json!(args.baseline));
    let runtime = format!(
        "herald Consumer runtime, no-op handler, concurrency {}, max_in_flight {}, CONSUMER_DEFAULTS",
        args.concurrency, args.max_in_flight
    );
    let (herald_side, bare_side, goal) = match args.baseline {
        Baseline::Bare => (
            runtime,
            "rdkafka BaseConsumer poll loop, store_offset per record, auto commit 1 s, CONSUMER_DEFAULTS".to_owned(),
            GOAL,
        ),
        Baseline::BareDecode => (
            runtime,
            "rdkafka BaseConsumer poll loop + Envelope::from_record and typed decode per record, store_offset per record, auto commit 1 s, CONSUMER_DEFAULTS".to_owned(),
            GOAL,
        ),
        Baseline::Uninstrumented => (
            format!("{runtime}; tracing-subscriber fmt at info + detailed metrics in a Prometheus registry"),
            format!("{runtime}; no subscriber, detailed metrics off"),
            INSTRUMENTATION_GOAL,
        ),
    };
    let mut comparison = Comparison {
        bench: "consumer",
        herald_side,
        bare_side,
        goal,
        ceiling: None,
        setup,
        rounds: Vec::new(),
        notes: Vec::new(),
    };
    for round in 0..common.rounds {
        let order = round_order(round);
        let mut results = RoundResults::default();
        for side in order {
            let spec = SideSpec {
                side,
                brokers: common.brokers.clone(),
                topic: topic.clone(),
                group: resources.group(&format!("r{}-{}", round + 1, side.name())),
                records: common.records,
                concurrency: args.concurrency,
                max_in_flight: args.max_in_flight,
                instrumented: match args.baseline {
                    Baseline::Bare | Baseline::BareDecode => None,
                    Baseline::Uninstrumented => Some(side == Side::Herald),
                },
                decode: args.baseline == Baseline::BareDecode,
            };
            let result = run_child(&AnySide::Consumer(spec), common.side_timeout_secs).await?;
            results.add("consumer", round, side, result);
        }
        comparison.rounds.push(results.finish(round, order)?);
    }
    Ok(comparison)
}

/// Fills `topic` with the run's records through herald's publisher; returns
/// the rate it produced at.
pub(crate) async fn pre_produce(common: &CommonArgs, topic: &str) -> anyhow::Result<f64> {
    let workload = Workload::new(common.payload_bytes, common.keys, common.records)?;
    let publisher = Publisher::new(&PublisherConfig::new(&common.brokers, SOURCE))?;
    let (workload, publisher, records) = (&workload, &publisher, common.records);
    const BATCH: u64 = 10_000;
    let start = Instant::now();
    let mut batches = futures::stream::iter((0..records).step_by(BATCH as usize))
        .map(|first| async move {
            let events: Vec<BenchEvent> = (first..(first + BATCH).min(records))
                .map(|i| workload.event(i))
                .collect();
            publisher
                .publish_batch(topic, &events)
                .await
                .into_iter()
                .find_map(Result::err)
        })
        .buffered(4);
    while let Some(error) = batches.next().await {
        if let Some(error) = error {
            bail!("pre-producing failed: {error}");
        }
    }
    Ok(rate(records, start.elapsed().as_secs_f64()))
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    match spec.side {
        Side::Herald => herald_side(&spec).await,
        Side::Bare if spec.instrumented.is_some() => herald_side(&spec).await,
        Side::Bare => tokio::task::spawn_blocking(move || bare_side(&spec))
            .await
            .context("bare side panicked")?,
    }
}

/// What a handler sees: when the first and the target-th record came.
pub(crate) struct Probe {
    target: u64,
    handled: AtomicU64,
    pub(crate) first: OnceLock<Instant>,
    pub(crate) last: OnceLock<Instant>,
    pub(crate) done: tokio::sync::Notify,
}

impl Probe {
    /// A probe waiting for `target` records.
    pub(crate) fn new(target: u64) -> Self {
        Self {
            target,
            handled: AtomicU64::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        }
    }

    /// Counts one handled record.
    pub(crate) fn hit(&self) {
        self.first.get_or_init(Instant::now);
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            let _ = self.last.set(Instant::now());
            self.done.notify_one();
        }
    }
}

async fn herald_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let probe = Arc::new(Probe::new(spec.records));
    let handler_probe = Arc::clone(&probe);
    let router = Router::new().handle("noop", move |_: BenchEvent, _: RecordInfo| {
        let probe = Arc::clone(&handler_probe);
        async move {
            probe.hit();
            Ok(())
        }
    });
    let mut config = ConsumerConfig::new(&spec.brokers, &spec.group, [&spec.topic])
        .concurrency(spec.concurrency)
        .max_in_flight(spec.max_in_flight);
    let mut registry = prometheus_client::registry::Registry::default();
    match spec.instrumented {
        None => {}
        Some(true) => {
            // What the service runs with by default: logs at info (written
            // nowhere here, so the terminal is not what is measured).
            // RUST_LOG, when set, replaces the filter (to see what a level
            // or a target costs).
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::sink)
                .try_init()
                .map_err(|e| anyhow::anyhow!("installing the subscriber: {e}"))?;
        }
        Some(false) => config = config.detailed_metrics(false),
    }
    let consumer = Consumer::new(config, router)?;
    let stats = consumer.stats();
    if spec.instrumented == Some(true) {
        registry.register_collector(Box::new(Arc::clone(&stats)));
    }
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
    let seconds = last.duration_since(*first).as_secs_f64();
    if spec.instrumented == Some(true) {
        // The registry must render what was collected.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        ensure!(
            text.contains("herald_consumer_handler_duration_seconds_count"),
            "no handler histogram in:\n{text}"
        );
    }
    Ok(SideResult::finish(spec.records, seconds)?
        .with(
            "startup_seconds",
            first.duration_since(started).as_secs_f64(),
        )
        .with("consumed", stats.consumed() as f64)
        .with("handled", stats.handled() as f64)
        .with("skipped_unknown", stats.skipped_unknown() as f64)
        .with("dead_lettered", stats.dead_lettered() as f64)
        .with("commit_failures", stats.commit_failures() as f64))
}

fn bare_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &spec.brokers);
    config.set("group.id", &spec.group);
    for (k, v) in CONSUMER_DEFAULTS {
        config.set(*k, *v);
    }
    config.set("enable.auto.commit", "true");
    config.set("enable.auto.offset.store", "false");
    config.set("auto.commit.interval.ms", "1000");
    let consumer: BaseConsumer = config.create().context("creating the bare consumer")?;
    consumer
        .subscribe(&[&spec.topic])
        .context("subscribing the bare consumer")?;
    let mut errors = 0u64;
    let started = Instant::now();
    let mut span = Span::default();
    let mut received = 0;
    while received < spec.records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                span.mark();
                if spec.decode {
                    decode(&message)?;
                }
                consumer
                    .store_offset_from_message(&message)
                    .context("storing an offset")?;
                received += 1;
            }
            Some(Err(error)) => {
                errors += 1;
                progress(format!("bare consumer error: {error}"));
            }
            None => {}
        }
    }
    let seconds = span.seconds();
    let startup = span
        .first()
        .map_or(0.0, |f| f.duration_since(started).as_secs_f64());
    ensure!(
        received == spec.records,
        "received {received} of {}",
        spec.records
    );
    // Dropping the consumer commits the stored offsets and leaves the group.
    drop(consumer);
    Ok(SideResult::finish(spec.records, seconds)?
        .with("startup_seconds", startup)
        .with("errors", errors as f64))
}

/// What a typed handler needs of a record before it can run: its envelope
/// (headers checked and parsed) and its typed event.
fn decode(message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
    let envelope = herald_kafka::envelope_of(message).context("decoding an envelope")?;
    let event: BenchEvent = envelope.decode().context("decoding an event")?;
    std::hint::black_box(event);
    Ok(())
}
