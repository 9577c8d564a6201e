//! `herald-bench processor`: what exactly-once costs in herald's
//! [`Processor`], in two parts.
//!
//! **Throughput.** The same processor with one trivial transform (one output
//! per input: the input event re-encoded to an output topic) runs once with
//! [`Guarantee::ExactlyOnce`] (a Kafka transaction per batch) and once with
//! [`Guarantee::AtLeastOnce`] (no transactions: every delivery awaited, then
//! the offsets committed through the consumer), same `--batch-size` and
//! `--batch-time-ms`, over one pre-produced input topic, each in its own
//! child process, fresh consumer group and fresh output topic. A side is
//! timed from its first transform call to the moment its statistics count
//! every input committed (joining the group is not measured). The order
//! alternates per round; the summary is the median of the per-round ratios.
//! A third side runs exactly once without duplicate detection
//! (`ProcessorConfig::deduplication(None)`); a note gives the median of
//! exactly-once (with it, the default) ÷ that side: what dropping
//! duplicate inputs costs (goal ≥ 0.9, [`DEDUP_GOAL`]).
//!
//! **Latency.** For each `--batch-sizes` entry (and once at least once, at
//! `--batch-size`, for reference) a processor runs in a child on a fresh,
//! empty input topic while this process produces to it open-loop at
//! `--rate` records/s (a steady moderate rate, so the figure is not the
//! queueing of a backlog) and reads the output topic with a
//! `read_committed` consumer. Latency of a record = the moment the reader
//! received its output − the moment its input was handed to the producer,
//! both on this process's clock, matched by event id (the output carries the
//! input's). Records are produced as probes until the first output arrives
//! (the processor joined its group), then `--warmup-secs` of warm-up; only
//! the `--rate` × `--seconds` records after that are measured.
//!
//! **Scale.** The same exactly-once processor, now with state partitioned
//! like its input (`ProcessorConfig::partitioned_state`: a count per key in
//! a [`ChangelogTable`], one changelog record and one output per input),
//! runs as one instance and as [`SCALE_INSTANCES`] instances of one group
//! (distinct instance ids, in one child process, each with its own
//! consumer, transactional producer and thread), over the same
//! pre-produced topic; timed from the first transform call of any instance
//! to every input committed, joining and restoring included after that
//! first call. The summary is the median of the per-round ratios. The
//! latency part measures both shapes too (`state-1` and `state-3`), the
//! several instances after `--group-warmup-secs` (the group forms first).
//!
//! **Time per transaction.** Every side of the throughput part also reports
//! where its time per committed transaction (at least once: per batch)
//! went — begin, process (polls, transforms, sends), offsets, deliveries,
//! commit — as mean, p50 and p99 (see [`split`]).

mod split;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use herald::HandlerError;
use herald_kafka::processor::{
    ChangelogRecord, ChangelogTable, Deduplication, Guarantee, Input, Processor, ProcessorConfig,
    Transform,
};
use herald_kafka::OutgoingRecord;
use herald_kafka::{Publisher, PublisherConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::SideSpec as AnySide;
use crate::shared::arrivals::{millis_between, ArrivalReader, Latencies, Measured, OpenLoop};
use crate::shared::child::{run_side as run_child, spawn_side, stdin_closed, SideResult};
use crate::shared::consume::Probe;
use crate::shared::report::{met, rounds, setup_line, Report, SideComparison, Sides};
use crate::shared::stats::{median, median_by, mib, per_second, rate, rotation};
use crate::shared::topics::RunResources;
use crate::shared::workload::{filled_topic, BenchEvent, Workload, SOURCE};
use crate::shared::{progress, CommonArgs};

/// The throughput the processor with duplicate detection should keep,
/// as a fraction of the same processor without it.
pub const DEDUP_GOAL: f64 = 0.9;

/// The instances of the scale part's larger side.
pub const SCALE_INSTANCES: usize = 3;

/// Flags of `herald-bench processor`.
#[derive(Debug, Clone, Args)]
#[command(mut_arg("records", |a| a
    .default_value("200000")
    .help("Records of the pre-produced input topic (the throughput part)")))]
#[command(mut_arg("rounds", |a| a
    .help("Throughput rounds; each runs both guarantees, the order alternating")))]
pub struct ProcessorArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    /// Inputs per transaction (per batch at least once) in the throughput
    /// part and in the at-least-once latency reference
    /// (`ProcessorConfig::batch_size`; 500 is its default).
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// The longest a transaction (batch) stays open, every run
    /// (`ProcessorConfig::batch_time`; 100 ms is its default).
    #[arg(long, default_value_t = 100)]
    pub batch_time_ms: u64,
    /// Transaction sizes of the latency part, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub batch_sizes: Vec<usize>,
    /// Records produced per second in the latency part (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of measured records per latency point.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of unmeasured warm-up after the first output arrived.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// The warm-up of the latency point with several instances: their
    /// group forms meanwhile (each instance that joins makes an eager
    /// rebalance, which drops and restores the state), and that is start-up,
    /// not the steady latency measured.
    #[arg(long, default_value_t = 10)]
    pub group_warmup_secs: u64,
    /// Latency rounds; each measures every point, the order rotating.
    #[arg(long, default_value_t = 1)]
    pub latency_rounds: usize,
    /// Run only one part.
    #[arg(long, value_enum)]
    pub only: Option<Part>,
    /// A librdkafka setting for every side's producer, `KEY=VALUE`
    /// (`ProcessorConfig::set_producer`; repeatable), e.g. `linger.ms=1`.
    #[arg(long = "set-producer", value_name = "KEY=VALUE", value_parser = key_value)]
    pub producer_settings: Vec<(String, String)>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

/// The two parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Exactly-once ÷ at-least-once throughput.
    Throughput,
    /// Output latency per transaction size.
    Latency,
    /// One vs three instances with partitioned state.
    Scale,
}

impl ProcessorArgs {
    /// Rejects values the benchmark cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.batch_time_ms > 0, "--batch-time-ms must be at least 1");
        ensure!(
            !self.batch_sizes.is_empty() && self.batch_sizes.iter().all(|&b| b > 0),
            "--batch-sizes needs sizes of at least 1"
        );
        ensure!(self.rate > 0, "--rate must be at least 1");
        ensure!(self.seconds > 0, "--seconds must be at least 1");
        ensure!(
            self.latency_rounds > 0,
            "--latency-rounds must be at least 1"
        );
        Ok(())
    }

    fn runs(&self, part: Part) -> bool {
        self.only.is_none_or(|only| only == part)
    }
}

/// The processor's guarantee, as a side names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `Guarantee::ExactlyOnce`.
    ExactlyOnce,
    /// `Guarantee::AtLeastOnce`.
    AtLeastOnce,
    /// `Guarantee::ExactlyOnce` without duplicate detection.
    ExactlyOnceNoDedup,
}

impl Sides for Mode {
    const ALL: &'static [Self] = &[
        Mode::ExactlyOnce,
        Mode::AtLeastOnce,
        Mode::ExactlyOnceNoDedup,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::ExactlyOnce => "exactly-once",
            Mode::AtLeastOnce => "at-least-once",
            Mode::ExactlyOnceNoDedup => "eo-no-dedup",
        }
    }
}

impl Mode {
    fn guarantee(self) -> Guarantee {
        match self {
            Mode::ExactlyOnce | Mode::ExactlyOnceNoDedup => Guarantee::ExactlyOnce,
            Mode::AtLeastOnce => Guarantee::AtLeastOnce,
        }
    }
}

/// The scale part's sides: how many instances share the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// One instance.
    One,
    /// [`SCALE_INSTANCES`] instances.
    Several,
}

impl Sides for Instances {
    const ALL: &'static [Self] = &[Instances::One, Instances::Several];

    fn name(self) -> &'static str {
        match self {
            Instances::One => "1-instance",
            Instances::Several => "3-instances",
        }
    }
}

impl Instances {
    fn count(self) -> usize {
        match self {
            Instances::One => 1,
            Instances::Several => SCALE_INSTANCES,
        }
    }
}

/// One processor, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    mode: Mode,
    brokers: String,
    input: String,
    output: String,
    group: String,
    batch_size: usize,
    batch_time_ms: u64,
    /// Throughput: stop once this many inputs are committed. Latency
    /// (`None`): run until the parent closes stdin.
    records: Option<u64>,
    /// The completed-ids topic of duplicate detection (exactly once).
    completed: Option<String>,
    /// `--set-producer` settings.
    #[serde(default)]
    producer_settings: Vec<(String, String)>,
    /// The changelog of a count per key, partitioned like the input
    /// (`None`: no state).
    #[serde(default)]
    state: Option<String>,
    /// Instances in the group (0 and 1 are one).
    #[serde(default)]
    instances: usize,
}

/// Runs the parts and returns the report.
pub async fn run(
    args: &ProcessorArgs,
    resources: &RunResources,
) -> anyhow::Result<ProcessorReport> {
    let mut setup = args.common.setup();
    setup.insert("batch_size".into(), json!(args.batch_size));
    setup.insert("batch_time_ms".into(), json!(args.batch_time_ms));
    setup.insert("batch_sizes".into(), json!(args.batch_sizes));
    setup.insert("rate".into(), json!(args.rate));
    setup.insert("seconds".into(), json!(args.seconds));
    setup.insert("group_warmup_secs".into(), json!(args.group_warmup_secs));
    if !args.producer_settings.is_empty() {
        let settings: serde_json::Map<String, Value> = args
            .producer_settings
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        setup.insert("producer_settings".into(), Value::Object(settings));
    }
    let throughput = if args.runs(Part::Throughput) {
        Some(throughput(args, resources, setup.clone()).await?)
    } else {
        None
    };
    let scale = if args.runs(Part::Scale) {
        Some(scale(args, resources, setup.clone()).await?)
    } else {
        None
    };
    let latency = if args.runs(Part::Latency) {
        latency(args, resources).await?
    } else {
        Vec::new()
    };
    let transaction_split = throughput.as_ref().map_or_else(Vec::new, |t| {
        split::summarize(t.sides.iter().map(|side| {
            let results = t
                .rounds
                .iter()
                .filter_map(|r| r.results.get(&side.name))
                .collect();
            (side.name.clone(), results)
        }))
    });
    Ok(ProcessorReport {
        setup,
        transaction_split,
        throughput,
        scale,
        latency,
        rate: args.rate,
        batch_time_ms: args.batch_time_ms,
    })
}

async fn throughput(
    args: &ProcessorArgs,
    resources: &RunResources,
    setup: serde_json::Map<String, Value>,
) -> anyhow::Result<SideComparison> {
    let common = &args.common;
    let input = filled_topic("processor", "proc-in", common, resources).await?;
    let describe = |mode| {
        match mode {
        Mode::ExactlyOnce => format!(
            "Processor, Guarantee::ExactlyOnce: one Kafka transaction per {} inputs or {} ms (outputs + send_offsets_to_transaction + commit)",
            args.batch_size, args.batch_time_ms
        ),
        Mode::AtLeastOnce => format!(
            "Processor, Guarantee::AtLeastOnce: idempotent producer, per {} inputs or {} ms every delivery awaited, then a synchronous offset commit",
            args.batch_size, args.batch_time_ms
        ),
        Mode::ExactlyOnceNoDedup => "the exactly-once side with ProcessorConfig::deduplication(None): no completed-ids record per input (the exactly-once side has one, its default)".to_owned(),
    }
    };
    let notes = vec![
        "both: one output per input (the input event re-encoded), read_committed input, the same pre-produced topic, fresh group and output topic per side; timed from the first transform call to the last input committed".to_owned(),
    ];
    let mut comparison =
        SideComparison::new("processor", Mode::AtLeastOnce, describe, setup, notes);
    comparison
        .run_rounds(common.rounds, async |round, mode: Mode| {
            let what = format!("r{}-{}", round + 1, mode.name());
            let shape = (mode, args.batch_size, None);
            let spec = side_spec(args, resources, &what, shape, input.clone()).await?;
            let spec = SideSpec {
                records: Some(common.records),
                ..spec
            };
            run_child(&AnySide::Processor(spec), common.side_timeout_secs, &[]).await
        })
        .await?;
    let dedup: Vec<f64> = comparison
        .rounds
        .iter()
        .map(|r| r.ratio(Mode::ExactlyOnce.name(), Mode::ExactlyOnceNoDedup.name()))
        .collect();
    let dedup = median(&dedup).unwrap_or(f64::NAN);
    comparison.notes.push(format!(
        "duplicate detection: exactly-once ÷ {} = {dedup:.2} (median of per-round ratios; goal ≥ {DEDUP_GOAL:.2}: {})",
        Mode::ExactlyOnceNoDedup.name(),
        met(dedup >= DEDUP_GOAL)
    ));
    Ok(comparison)
}

/// A fresh completed-ids topic with `partitions` for a side that detects
/// duplicates.
async fn completed_topic(
    resources: &RunResources,
    mode: Mode,
    what: &str,
    partitions: i32,
) -> anyhow::Result<Option<String>> {
    if mode != Mode::ExactlyOnce {
        return Ok(None);
    }
    Ok(Some(
        resources
            .topic(&format!("{what}-completed"), partitions)
            .await?,
    ))
}

/// One vs [`SCALE_INSTANCES`] instances of the exactly-once processor with
/// partitioned state, over one pre-produced topic.
async fn scale(
    args: &ProcessorArgs,
    resources: &RunResources,
    setup: serde_json::Map<String, Value>,
) -> anyhow::Result<SideComparison> {
    let common = &args.common;
    let input = filled_topic("processor", "scale-in", common, resources).await?;
    let describe = |instances: Instances| {
        format!(
            "Processor, Guarantee::ExactlyOnce, partitioned state (a count per key), {} instance(s) of one group in one process",
            instances.count()
        )
    };
    let notes = vec![format!(
        "both: one output and one changelog record per input, duplicate detection on, {} inputs or {} ms per transaction, the same pre-produced topic of {} partitions, fresh group, output, changelog and completed-ids topics per side; timed from the first transform call of any instance to the last input committed",
        args.batch_size, args.batch_time_ms, common.partitions
    )];
    let mut comparison =
        SideComparison::new("processor-scale", Instances::One, describe, setup, notes);
    comparison
        .run_rounds(common.rounds, async |round, instances: Instances| {
            let what = format!("s{}-{}", round + 1, instances.name());
            let shape = (Mode::ExactlyOnce, args.batch_size, Some(instances.count()));
            let spec = side_spec(args, resources, &what, shape, input.clone()).await?;
            let spec = SideSpec {
                records: Some(common.records),
                ..spec
            };
            run_child(&AnySide::Processor(spec), common.side_timeout_secs, &[]).await
        })
        .await?;
    Ok(comparison)
}

/// A side of `shape` reading `input`, with fresh output, group and (as
/// the shape asks) completed-ids and changelog topics, run until stdin
/// closes. With partitioned state every topic has the input's partitions.
async fn side_spec(
    args: &ProcessorArgs,
    resources: &RunResources,
    what: &str,
    (mode, batch_size, stateful): PointShape,
    input: String,
) -> anyhow::Result<SideSpec> {
    let common = &args.common;
    let state = match stateful {
        Some(_) => Some(
            resources
                .topic(&format!("{what}-state"), common.partitions)
                .await?,
        ),
        None => None,
    };
    let completed_partitions = if stateful.is_some() {
        common.partitions
    } else {
        1
    };
    Ok(SideSpec {
        mode,
        brokers: common.brokers.clone(),
        input,
        output: resources
            .topic(&format!("{what}-out"), common.partitions)
            .await?,
        group: resources.group(what),
        batch_size,
        batch_time_ms: args.batch_time_ms,
        records: None,
        completed: completed_topic(resources, mode, what, completed_partitions).await?,
        producer_settings: args.producer_settings.clone(),
        state,
        instances: stateful.unwrap_or(1),
    })
}

/// One latency point of one round.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    /// 1-based.
    pub round: usize,
    /// The processor's guarantee.
    pub mode: Mode,
    /// Inputs per transaction (batch).
    pub batch_size: usize,
    /// With partitioned state: how many instances shared the work
    /// (`None`: one instance, no state).
    pub stateful_instances: Option<usize>,
    /// Records measured (produced in the measured window and received).
    pub events: u64,
    /// Measured records whose output never arrived.
    pub missing: u64,
    /// Outputs received more than once.
    pub duplicates: u64,
    /// The rate produced in the measured window (records/s).
    pub produced_rate: f64,
    /// The rate the measured outputs arrived at: their count over the time
    /// from the first one's arrival to the last one's (records/s).
    pub output_rate: f64,
    /// The processor did not keep up with the input rate (outputs missing,
    /// or arriving at under 90 % of it): its latency is mostly queueing and
    /// grows with the length of the run.
    pub overloaded: bool,
    /// Input produce → output visible, percentiles.
    #[serde(flatten)]
    pub latency: Latencies,
    /// Mean inputs per committed transaction (batch), over the whole run.
    pub inputs_per_commit: f64,
    /// The processor child's peak RSS (KiB).
    pub peak_rss_kib: u64,
}

/// What a latency point runs: a guarantee, a batch size and, with
/// partitioned state, how many instances.
type PointShape = (Mode, usize, Option<usize>);

/// The latency points: every `--batch-sizes` entry exactly once, the
/// at-least-once reference, then the scale part's two shapes at
/// `--batch-size` (with partitioned state, one and [`SCALE_INSTANCES`]
/// instances).
fn latency_points(args: &ProcessorArgs) -> Vec<PointShape> {
    let mut points: Vec<PointShape> = args
        .batch_sizes
        .iter()
        .map(|&size| (Mode::ExactlyOnce, size, None))
        .collect();
    points.push((Mode::AtLeastOnce, args.batch_size, None));
    for instances in Instances::ALL {
        points.push((Mode::ExactlyOnce, args.batch_size, Some(instances.count())));
    }
    points
}

/// A latency point's name in reports.
fn point_name((mode, batch_size, stateful): PointShape) -> String {
    let base = match mode {
        Mode::ExactlyOnce => format!("batch {batch_size}"),
        Mode::AtLeastOnce => format!("at-least-once batch {batch_size}"),
        Mode::ExactlyOnceNoDedup => format!("no-dedup batch {batch_size}"),
    };
    match stateful {
        None => base,
        Some(n) => format!("{base}, state, {n} instance(s)"),
    }
}

async fn latency(
    args: &ProcessorArgs,
    resources: &RunResources,
) -> anyhow::Result<Vec<LatencyPoint>> {
    let common = &args.common;
    let points = latency_points(args);
    let workload = Workload::new(common.payload_bytes, common.keys, u64::MAX / 2)?;
    let publisher = Arc::new(Publisher::new(&PublisherConfig::new(
        &common.brokers,
        SOURCE,
    ))?);
    let mut next_seq = 0u64;
    let mut measured = Vec::new();
    for round in 0..args.latency_rounds {
        for i in rotation(points.len(), round) {
            let (mode, batch_size, stateful) = points[i];
            let what = match stateful {
                None => format!("lat-r{}-{}-b{batch_size}", round + 1, mode.name()),
                Some(n) => format!("lat-r{}-state{n}-b{batch_size}", round + 1),
            };
            let input = resources
                .topic(&format!("{what}-in"), common.partitions)
                .await?;
            let spec = side_spec(args, resources, &what, points[i], input).await?;
            let name = point_name(points[i]);
            let point =
                measure_latency(args, resources, &publisher, &workload, spec, &mut next_seq)
                    .await
                    .with_context(|| format!("latency round {} {name}", round + 1))?;
            let point = LatencyPoint {
                round: round + 1,
                ..point
            };
            progress(format!(
                "processor latency round {} {name}: {} records, p50 {:.1} ms, p99 {:.1} ms",
                round + 1,
                point.events,
                point.latency.p50_ms,
                point.latency.p99_ms
            ));
            measured.push(point);
        }
    }
    Ok(measured)
}

/// Per input: its id, when it was handed to the producer, and whether it is
/// measured.
type Sent = (Uuid, SystemTime, bool);

async fn measure_latency(
    args: &ProcessorArgs,
    resources: &RunResources,
    publisher: &Arc<Publisher>,
    workload: &Workload,
    spec: SideSpec,
    next_seq: &mut u64,
) -> anyhow::Result<LatencyPoint> {
    let common = &args.common;
    let reader = ArrivalReader::start(&common.brokers, resources, &spec.output, common.partitions)?;
    let processor = spawn_side(
        &AnySide::Processor(spec.clone()),
        common.side_timeout_secs,
        &[],
    )?;
    let warmup = if spec.instances > 1 {
        args.group_warmup_secs
    } else {
        args.warmup_secs
    };
    let schedule = OpenLoop::new(
        args.rate,
        Duration::from_secs(warmup),
        u64::from(args.rate) * args.seconds,
    );
    // Every output of a committed transaction arrives within a batch time
    // plus the commit; give slow machines plenty more.
    let grace = Duration::from_millis(spec.batch_time_ms);
    let run = schedule.run(reader, processor, "the processor", grace, |measured| {
        let event = workload.event(*next_seq);
        *next_seq += 1;
        let sent: Sent = (herald::Event::event_id(&event), SystemTime::now(), measured);
        let (publisher, input) = (Arc::clone(publisher), spec.input.clone());
        Ok(async move {
            publisher
                .publish(&input, &event)
                .await
                .context("producing an input")?;
            anyhow::Ok(sent)
        })
    });
    let stateful = spec.state.is_some().then_some(spec.instances.max(1));
    Ok(figures((spec.mode, spec.batch_size, stateful), run.await?))
}

fn figures(
    (mode, batch_size, stateful_instances): PointShape,
    run: Measured<Sent>,
) -> LatencyPoint {
    // The first arrival of each output counts; later ones are duplicates.
    let mut first: HashMap<Uuid, SystemTime> = HashMap::with_capacity(run.arrivals.len());
    let mut duplicates = 0;
    for arrival in &run.arrivals {
        if first.insert(arrival.event_id, arrival.received).is_some() {
            duplicates += 1;
        }
    }
    let mut latencies = Vec::new();
    let mut missing = 0;
    let mut produced = 0;
    let mut received_span: Option<(SystemTime, SystemTime)> = None;
    for (event_id, at, _) in run.writes.iter().filter(|(_, _, measured)| *measured) {
        produced += 1;
        match first.get(event_id) {
            Some(&received) => {
                latencies.push(millis_between(*at, received));
                received_span = Some(match received_span {
                    None => (received, received),
                    Some((a, b)) => (a.min(received), b.max(received)),
                });
            }
            None => missing += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let produced_rate = rate(produced, run.window);
    let output_rate = received_span.map_or(0.0, |(a, b)| {
        rate(latencies.len() as u64, millis_between(a, b) / 1000.0)
    });
    let extra = |name: &str| run.side.extra.get(name).copied().unwrap_or_default();
    LatencyPoint {
        round: 0,
        mode,
        batch_size,
        stateful_instances,
        events: latencies.len() as u64,
        missing,
        duplicates,
        produced_rate,
        output_rate,
        overloaded: missing > 0 || output_rate < 0.9 * produced_rate,
        latency: Latencies::of(&latencies),
        inputs_per_commit: extra("committed_inputs") / extra("commits").max(1.0),
        peak_rss_kib: run.side.peak_rss_kib,
    }
}

/// The bench transform: one output per input (the input event
/// re-encoded); with state, also a count per key, partitioned like the
/// input, whose change is one more output.
struct Counting {
    output: String,
    probe: Arc<Probe>,
    counts: Option<ChangelogTable<u64>>,
}

impl Transform<BenchEvent> for Counting {
    async fn process(
        &mut self,
        event: BenchEvent,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        self.probe.hit();
        let output = input.output(&self.output, &event)?;
        let Some(counts) = self.counts.as_mut() else {
            return Ok(vec![output]);
        };
        let key = &input.envelope.key;
        let count = counts.get(key).copied().unwrap_or(0) + 1;
        Ok(vec![
            counts.put_in(input.partition, key.clone(), count)?,
            output,
        ])
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        self.counts.as_mut().map_or(Ok(()), |c| c.restore(record))
    }

    fn commit(&mut self) {
        if let Some(counts) = self.counts.as_mut() {
            counts.commit();
        }
    }

    fn rollback(&mut self) {
        if let Some(counts) = self.counts.as_mut() {
            counts.rollback();
        }
    }

    fn revoked(&mut self, partitions: &[i32]) {
        if let Some(counts) = self.counts.as_mut() {
            counts.drop_partitions(partitions);
        }
    }
}

/// Runs the side's processor instances (one group, counting into one set
/// of statistics) in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let capture = split::Capture::install()?;
    let probe = Arc::new(Probe::new(spec.records.unwrap_or(u64::MAX)));
    let stats = Arc::<herald_kafka::processor::ProcessorStats>::default();
    let mut processors = Vec::new();
    for instance in 0..spec.instances.max(1) {
        let mut config = ProcessorConfig::new(
            &spec.brokers,
            &spec.group,
            [&spec.input],
            format!("bench-{instance}"),
        )
        .source(SOURCE)
        .guarantee(spec.mode.guarantee())
        .batch_size(spec.batch_size)
        .batch_time(Duration::from_millis(spec.batch_time_ms))
        .deduplication(spec.completed.as_ref().map(|topic| Deduplication {
            topic: Some(topic.clone()),
            ..Deduplication::default()
        }));
        if let Some(state) = &spec.state {
            config = config.changelog(state).partitioned_state(true);
        }
        for (key, value) in &spec.producer_settings {
            config = config.set_producer(key, value);
        }
        let transform = Counting {
            output: spec.output.clone(),
            probe: Arc::clone(&probe),
            counts: spec.state.as_ref().map(ChangelogTable::new),
        };
        processors.push(Processor::new(config, transform)?.with_stats(Arc::clone(&stats)));
    }
    let started = Instant::now();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut running = tokio::task::JoinSet::new();
    for processor in processors {
        let mut stopping = stopping.clone();
        running.spawn(processor.run(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }));
    }
    let seconds = match spec.records {
        Some(records) => {
            // The clock stops when the last input's offset is committed
            // (with its output, or after it), read every millisecond.
            let finished = loop {
                if stats.committed_inputs() >= records {
                    break Instant::now();
                }
                if let Some(ended) = running.try_join_next() {
                    ended.context("a processor task panicked")??;
                    bail!("a processor stopped before every input was committed");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let _ = stop.send(true);
            let Some(first) = probe.first.get() else {
                bail!("the transform never ran");
            };
            finished.duration_since(*first).as_secs_f64()
        }
        None => {
            stdin_closed().await;
            let _ = stop.send(true);
            started.elapsed().as_secs_f64()
        }
    };
    while let Some(ended) = running.join_next().await {
        ended.context("a processor task panicked")??;
    }
    // Throughput: the inputs it waited for; latency: what it committed.
    let records = spec.records.unwrap_or_else(|| stats.committed_inputs());
    ensure!(
        stats.dead_lettered() == 0,
        "{} inputs were dead-lettered",
        stats.dead_lettered()
    );
    let startup = probe
        .first
        .get()
        .map_or(0.0, |f| f.duration_since(started).as_secs_f64());
    let result = SideResult::finish(records, seconds)?;
    Ok(capture
        .add_to(result)
        .with("startup_seconds", startup)
        .with("consumed", stats.consumed() as f64)
        .with("processed", stats.processed() as f64)
        .with("produced", stats.produced() as f64)
        .with("commits", stats.committed() as f64)
        .with("committed_inputs", stats.committed_inputs() as f64)
        .with("aborted", stats.aborted() as f64)
        .with("retried", stats.retried() as f64))
}

/// The report of `herald-bench processor`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessorReport {
    /// Settings.
    pub setup: serde_json::Map<String, Value>,
    /// Exactly-once ÷ at-least-once throughput (unless `--only latency`).
    pub throughput: Option<SideComparison>,
    /// Three instances ÷ one with partitioned state (unless another part
    /// was asked for alone).
    pub scale: Option<SideComparison>,
    /// Every latency point of every round (empty with `--only throughput`).
    pub latency: Vec<LatencyPoint>,
    /// Where each throughput side's time per transaction went.
    pub transaction_split: Vec<split::SideSplit>,
    rate: u32,
    batch_time_ms: u64,
}

impl ProcessorReport {
    /// The latency points in report order with their medians over the
    /// rounds: (shape, p50, p99, rounds, overloaded in any).
    fn latency_summary(&self) -> Vec<(PointShape, f64, f64, usize, bool)> {
        let shape = |p: &LatencyPoint| (p.mode, p.batch_size, p.stateful_instances);
        let mut keys: Vec<PointShape> = Vec::new();
        for point in &self.latency {
            if !keys.contains(&shape(point)) {
                keys.push(shape(point));
            }
        }
        keys.into_iter()
            .map(|key| {
                let points: Vec<&LatencyPoint> =
                    self.latency.iter().filter(|p| shape(p) == key).collect();
                (
                    key,
                    median_by(&points, |p| p.latency.p50_ms),
                    median_by(&points, |p| p.latency.p99_ms),
                    points.len(),
                    points.iter().any(|p| p.overloaded),
                )
            })
            .collect()
    }

    /// The latency summary line.
    pub fn latency_line(&self) -> Option<String> {
        let summary = self.latency_summary();
        let most = summary.iter().map(|s| s.3).max()?;
        let figures: Vec<String> = summary
            .iter()
            .map(|(shape, p50, p99, _, overloaded)| {
                let name = point_name(*shape);
                let overloaded = if *overloaded { " OVERLOADED" } else { "" };
                format!("{name}: p50 {p50:.1} ms, p99 {p99:.1} ms{overloaded}")
            })
            .collect();
        Some(format!(
            "processor latency at {} rec/s (input produced → output visible to read_committed, batch time {} ms): {} (median of {})",
            per_second(f64::from(self.rate)),
            self.batch_time_ms,
            figures.join("; "),
            rounds(most),
        ))
    }
}

impl Report for ProcessorReport {
    fn table(&self) -> String {
        let mut out = String::new();
        if let Some(throughput) = &self.throughput {
            out.push_str(&throughput.table());
            out.push_str(&split::table(&self.transaction_split));
        }
        if let Some(scale) = &self.scale {
            out.push_str(&scale.table());
        }
        if self.latency.is_empty() {
            return out;
        }
        out.push_str(&format!("processor latency: {}\n", setup_line(&self.setup)));
        out.push_str(&format!(
            "{:>5}  {:<14} {:>6} {:>7} {:>7} {:>5} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}\n",
            "round",
            "mode",
            "batch",
            "records",
            "missing",
            "dups",
            "in/s",
            "out/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "in/commit",
            "RSS"
        ));
        for p in &self.latency {
            out.push_str(&format!(
                "{:>5}  {:<14} {:>6} {:>7} {:>7} {:>5} {:>8} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>9}{}\n",
                p.round,
                match p.stateful_instances {
                    None => p.mode.name().to_owned(),
                    Some(n) => format!("state-{n}"),
                },
                p.batch_size,
                p.events,
                p.missing,
                p.duplicates,
                per_second(p.produced_rate),
                per_second(p.output_rate),
                p.latency.p50_ms,
                p.latency.p90_ms,
                p.latency.p99_ms,
                p.latency.max_ms,
                p.inputs_per_commit,
                mib(p.peak_rss_kib),
                if p.overloaded { "  OVERLOADED" } else { "" },
            ));
        }
        out.push_str(&format!(
            "  latency = the read_committed reader's receive time − the input's hand-over to the producer (one clock; includes the input's own produce, ~linger.ms 5); a transaction commits after batch_size inputs or {} ms, whichever comes first\n",
            self.batch_time_ms
        ));
        out.push_str("  OVERLOADED: the processor did not keep up with the input rate (outputs missing or arriving under 90 % of it), so its latency is queueing that grows with the run\n");
        if let Some(line) = self.latency_line() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    fn json(&self) -> Value {
        json!({
            "bench": "processor",
            "setup": self.setup,
            "throughput": self.throughput.as_ref().map(Report::json),
            "scale": self.scale.as_ref().map(Report::json),
            "transaction_split": self.transaction_split,
            "latency": self.latency,
            "latency_summary_line": self.latency_line(),
        })
    }
}
