//! `herald-bench consumer`: herald's consumer runtime (a [`Router`] with one
//! no-op handler, keys in parallel) against a bare rdkafka `BaseConsumer`
//! loop that stores each record's offset (`enable.auto.offset.store=false`,
//! `store_offset_from_message` per record, auto commit every second like the
//! runtime's commit interval). Both read the same pre-produced topic (herald
//! envelopes, so the runtime decodes real events) from the start, each in a
//! fresh consumer group with the same librdkafka consumer defaults
//! ([`CONSUMER_DEFAULTS`]). Each side is timed from its first record to its
//! last: joining the group is not measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use herald_kafka::consumer::CONSUMER_DEFAULTS;
use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::SideSpec as AnySide;
use crate::shared::build;
use crate::shared::child::{run_side as run_child, SideResult};
use crate::shared::consume::{consume, Probe};
use crate::shared::report::{Comparison, Round};
use crate::shared::stats::{Side, Span};
use crate::shared::topics::RunResources;
use crate::shared::workload::{filled_topic, BenchEvent};
use crate::shared::{progress, CommonArgs};

/// The ratio herald's consumer runtime should reach.
pub const GOAL: f64 = 0.8;

/// Flags of `herald-bench consumer`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
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
    /// the cost of instrumentation, goal ≥ 0.95), or `plain-stream` (the
    /// loop a user would write by hand instead of herald: an rdkafka
    /// `StreamConsumer`, serde decoding of the body into the typed event,
    /// `store_offset` per record and auto commit), or `ruststream` (the
    /// nearest Rust peer, RustStream 0.7.7 with ruststream-rdkafka 0.7.1: a
    /// typed serde handler, `Commit::Tracked`, 64 lanes by record key, and
    /// herald's librdkafka consumer defaults; built from
    /// `peers/ruststream-consumer` on first use).
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
    /// A hand-written async loop: rdkafka `StreamConsumer`, serde decoding
    /// of the body, offset stored per record, auto commit.
    PlainStream,
    /// RustStream, the nearest Rust peer (`peers/ruststream-consumer`).
    #[value(name = "ruststream")]
    #[serde(rename = "ruststream")]
    RustStream,
}

/// The ratio instrumented ÷ uninstrumented should reach.
pub const INSTRUMENTATION_GOAL: f64 = 0.95;

/// One side of the consumer benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    args: ConsumerArgs,
    side: Side,
    topic: String,
    group: String,
    /// The peer's binary, when the baseline is one.
    peer: Option<PathBuf>,
}

impl SideSpec {
    /// `None`: the runtime's defaults, no subscriber (against the bare
    /// loop); `Some(on)`: tracing at info and detailed metrics on or off.
    fn instrumented(&self) -> Option<bool> {
        (self.args.baseline == Baseline::Uninstrumented).then_some(self.side == Side::Herald)
    }
}

/// Runs the rounds and returns the comparison.
pub async fn run(args: &ConsumerArgs, resources: &RunResources) -> anyhow::Result<Comparison> {
    let common = &args.common;
    let topic = filled_topic("consumer", "consume", common, resources).await?;
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
        Baseline::PlainStream => (
            runtime,
            "rdkafka StreamConsumer recv loop + serde_json decode of the body into the typed event, store_offset per record, auto commit 1 s, CONSUMER_DEFAULTS".to_owned(),
            1.0,
        ),
        Baseline::RustStream => (
            runtime,
            "RustStream 0.7.7 (ruststream-rdkafka 0.7.1): typed serde handler, Commit::Tracked, workers(64, by_key), CONSUMER_DEFAULTS".to_owned(),
            1.0,
        ),
        Baseline::Uninstrumented => (
            format!("{runtime}; tracing-subscriber fmt at info + detailed metrics in a Prometheus registry"),
            format!("{runtime}; no subscriber, detailed metrics off"),
            INSTRUMENTATION_GOAL,
        ),
    };
    let peer = match args.baseline {
        Baseline::RustStream => Some(build::peer_binary("ruststream-consumer").await?),
        _ => None,
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
        let round = Round::run("consumer", round, async |side| {
            let spec = SideSpec {
                args: args.clone(),
                side,
                topic: topic.clone(),
                group: resources.group(&format!("r{}-{}", round + 1, side.name())),
                peer: peer.clone(),
            };
            run_child(&AnySide::Consumer(spec), common.side_timeout_secs, &[]).await
        })
        .await?;
        comparison.rounds.push(round);
    }
    Ok(comparison)
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    match spec.side {
        Side::Herald => herald_side(&spec).await,
        Side::Bare if spec.instrumented().is_some() => herald_side(&spec).await,
        Side::Bare if spec.args.baseline == Baseline::PlainStream => plain_stream_side(&spec).await,
        Side::Bare if spec.args.baseline == Baseline::RustStream => ruststream_side(&spec).await,
        Side::Bare => tokio::task::spawn_blocking(move || bare_side(&spec))
            .await
            .context("bare side panicked")?,
    }
}

async fn herald_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let (args, records) = (&spec.args, spec.args.common.records);
    let probe = Arc::new(Probe::new(records));
    let handler_probe = Arc::clone(&probe);
    let router = Router::new().handle("noop", move |_: BenchEvent, _: RecordInfo| {
        let probe = Arc::clone(&handler_probe);
        async move {
            probe.hit();
            Ok(())
        }
    });
    let mut config = ConsumerConfig::new(&args.common.brokers, &spec.group, [&spec.topic])
        .concurrency(args.concurrency)
        .max_in_flight(args.max_in_flight);
    let mut registry = prometheus_client::registry::Registry::default();
    match spec.instrumented() {
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
    if spec.instrumented() == Some(true) {
        registry.register_collector(Box::new(Arc::clone(&stats)));
    }
    let result = consume(consumer, &probe, records).await?;
    if spec.instrumented() == Some(true) {
        // The registry must render what was collected.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        ensure!(
            text.contains("herald_consumer_handler_duration_seconds_count"),
            "no handler histogram in:\n{text}"
        );
    }
    Ok(result.with("skipped_unknown", stats.skipped_unknown() as f64))
}

/// The librdkafka settings of the hand-written baselines: herald's
/// consumer defaults, offsets stored by the loop and committed every second
/// (the runtime's commit interval).
fn baseline_config(spec: &SideSpec) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &spec.args.common.brokers);
    config.set("group.id", &spec.group);
    for (k, v) in CONSUMER_DEFAULTS {
        config.set(*k, *v);
    }
    config.set("enable.auto.commit", "true");
    config.set("enable.auto.offset.store", "false");
    config.set("auto.commit.interval.ms", "1000");
    config
}

/// The hand-written async loop a user would compare herald with.
async fn plain_stream_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    use rdkafka::consumer::StreamConsumer;
    use rdkafka::Message as _;
    let records = spec.args.common.records;
    let consumer: StreamConsumer = baseline_config(spec)
        .create()
        .context("creating the stream consumer")?;
    consumer
        .subscribe(&[&spec.topic])
        .context("subscribing the stream consumer")?;
    let started = Instant::now();
    let mut span = Span::default();
    let mut received = 0;
    while received < records {
        let message = consumer.recv().await.context("receiving a record")?;
        span.mark();
        let event: BenchEvent = serde_json::from_slice(message.payload().unwrap_or_default())
            .context("decoding a record's body")?;
        std::hint::black_box(event);
        consumer
            .store_offset_from_message(&message)
            .context("storing an offset")?;
        received += 1;
    }
    let seconds = span.seconds();
    let startup = span
        .first()
        .map_or(0.0, |f| f.duration_since(started).as_secs_f64());
    drop(consumer);
    Ok(SideResult::finish(records, seconds)?.with("startup_seconds", startup))
}

/// RustStream in its own process (`peers/ruststream-consumer`), given
/// herald's librdkafka consumer defaults; it reports records, seconds from
/// its first record to its last, and its peak RSS as one JSON line.
async fn ruststream_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let binary = spec
        .peer
        .as_ref()
        .context("no RustStream binary in the spec")?;
    let records = spec.args.common.records;
    let mut command = tokio::process::Command::new(binary);
    command.args([
        spec.args.common.brokers.as_str(),
        &spec.topic,
        &spec.group,
        &records.to_string(),
    ]);
    for (key, value) in CONSUMER_DEFAULTS {
        command.arg("--set").arg(format!("{key}={value}"));
    }
    let output = command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "RustStream failed ({}): {stdout}",
        output.status
    );
    let line = stdout
        .lines()
        .last()
        .context("RustStream printed nothing")?;
    let peer: PeerReport =
        serde_json::from_str(line).with_context(|| format!("reading RustStream's {line:?}"))?;
    ensure!(
        peer.records >= records,
        "RustStream handled {} of {records}",
        peer.records
    );
    Ok(SideResult {
        records,
        seconds: peer.seconds,
        peak_rss_kib: peer.peak_rss_kib,
        extra: Default::default(),
    })
}

/// The line a peer process prints when it is done.
#[derive(Debug, Deserialize)]
struct PeerReport {
    records: u64,
    seconds: f64,
    peak_rss_kib: u64,
}

fn bare_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let records = spec.args.common.records;
    let decodes = spec.args.baseline == Baseline::BareDecode;
    let consumer: BaseConsumer = baseline_config(spec)
        .create()
        .context("creating the bare consumer")?;
    consumer
        .subscribe(&[&spec.topic])
        .context("subscribing the bare consumer")?;
    let mut errors = 0u64;
    let started = Instant::now();
    let mut span = Span::default();
    let mut received = 0;
    while received < records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                span.mark();
                if decodes {
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
    ensure!(received == records, "received {received} of {records}");
    // Dropping the consumer commits the stored offsets and leaves the group.
    drop(consumer);
    Ok(SideResult::finish(records, seconds)?
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
