//! `herald-bench relay-latency`: how long an event takes from its writer's
//! commit to a consumer reading it from Kafka, through herald's outbox relay
//! at a steady, moderate rate — with LISTEN/NOTIFY (the relay wakes on the
//! commit's notification) and without it (`PgOutbox::listen(false)`: an idle
//! relay sleeps its poll interval, `--poll-interval-ms`, 1,000 ms by default
//! like `RelayConfig`).
//!
//! Each mode of each round gets an empty outbox and a fresh topic. The relay
//! runs in its own child process (`Relay::run` until the parent closes its
//! stdin). The parent runs the writers — open-loop at `--rate` events/s, each
//! event one transaction (`enqueue` + commit) on a pool of `--writers`
//! connections — and a bare rdkafka consumer assigned to every partition of
//! the topic. Latency of an event = the moment the consumer received it
//! minus the moment its writer's commit returned, both read from this
//! process's wall clock. Also reported: commit → the record's Kafka
//! timestamp (`CreateTime`, stamped by the relay's producer when it sends,
//! millisecond resolution). Writing starts with probe events until the
//! first one arrives (the relay and the consumer are up), then
//! `--warmup-secs` of warm-up; neither is measured. The consumer reads
//! `read_committed`.
//!
//! `--compare delivery` runs the two relays instead, both listening: the
//! exactly-once `TransactionalRelay` and the at-least-once `Relay` (goal:
//! exactly-once p99 ≤ 2 × at-least-once p99).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context};
use clap::{Args, ValueEnum};
use herald_kafka::{Publisher, PublisherConfig, RelayConfig};
use herald_postgres::outbox::enqueue;
use herald_postgres::{OutboxRecord, PgOutbox, StoreError};
use rdkafka::producer::Producer as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::relay::AnyRelay;
use super::SideSpec as AnySide;
use crate::shared::arrivals::{
    millis_between, Arrival, ArrivalReader, Latencies, Measured, OpenLoop,
};
use crate::shared::child::{spawn_side, stdin_closed, SideResult};
use crate::shared::database::{self, child_pool, BenchDatabase, DbArgs, CHILD_DATABASE_URL};
use crate::shared::progress;
use crate::shared::report::{both_sides, finish_table, met, rounds, setup_line, Report};
use crate::shared::stats::{median_by, mib, per_second, rate, round_order, Side};
use crate::shared::topics::{learn_topic, RunResources};
use crate::shared::workload::{Workload, SOURCE};

/// Flags of `herald-bench relay-latency`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RelayLatencyArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = herald_test::DEFAULT_KAFKA_BROKERS)]
    pub brokers: String,
    // Never sent to a child: the admin URL carries a password.
    #[command(flatten)]
    #[serde(skip)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Events committed per second (open loop: event i is due at i / rate).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of measured events per mode and round.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Seconds of unmeasured warm-up after the first event arrived.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// The relay's poll interval (`RelayConfig::poll_interval`), in ms: how
    /// long an idle relay waits for a notification, or sleeps without one.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Rows the relay claims per pass (`RelayConfig::batch_size`).
    #[arg(long, default_value_t = RelayConfig::default().batch_size)]
    pub relay_batch: usize,
    /// Relay workers (`RelayConfig::workers`).
    #[arg(long, default_value_t = RelayConfig::default().workers)]
    pub relay_workers: usize,
    /// Writer connections (transactions in flight at most).
    #[arg(long, default_value_t = 16)]
    pub writers: u32,
    /// Bytes of each event's JSON body.
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Partitions of every benchmark topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Distinct keys (aggregate ids), cycled through in order.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Rounds; each runs both modes, the order alternating.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Give up on a mode that has not finished after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub side_timeout_secs: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Which two relays each round compares.
    #[arg(long, value_enum, default_value_t = LatencyCompare::Listen)]
    pub compare: LatencyCompare,
}

/// The two modes each round runs (`--compare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyCompare {
    /// The at-least-once relay with LISTEN/NOTIFY, and polling only.
    Listen,
    /// The exactly-once relay and the at-least-once relay, both listening.
    Delivery,
}

impl LatencyCompare {
    /// The name of the mode `side` runs.
    fn mode_name(self, side: Side) -> &'static str {
        match (self, side) {
            (LatencyCompare::Listen, Side::Herald) => "listen",
            (LatencyCompare::Listen, Side::Bare) => "poll",
            (LatencyCompare::Delivery, Side::Herald) => "exactly",
            (LatencyCompare::Delivery, Side::Bare) => "at-least",
        }
    }
}

impl RelayLatencyArgs {
    /// Rejects values the benchmark cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.rate > 0, "--rate must be at least 1");
        ensure!(self.seconds > 0, "--seconds must be at least 1");
        ensure!(self.writers > 0, "--writers must be at least 1");
        ensure!(self.relay_batch > 0, "--relay-batch must be at least 1");
        ensure!(self.partitions > 0, "--partitions must be at least 1");
        ensure!(self.rounds > 0, "--rounds must be at least 1");
        ensure!(self.keys > 0, "--keys must be at least 1");
        Workload::new(self.payload_bytes, self.keys, self.measured() * 10)?;
        Ok(())
    }

    fn measured(&self) -> u64 {
        u64::from(self.rate) * self.seconds
    }
}

/// The relay of one mode, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    args: RelayLatencyArgs,
    topic: String,
    listen: bool,
    /// The exactly-once relay, with this checkpoint topic (and
    /// `transactional_id_prefix`); `None`: the at-least-once relay.
    checkpoint_topic: Option<String>,
    transactional_id_prefix: String,
}

/// One mode's figures in one round.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// Events measured (written in the measured window and received).
    pub events: u64,
    /// Measured events written but never received.
    pub missing: u64,
    /// The rate the writers achieved in the measured window (events/s).
    pub written_rate: f64,
    /// Commit → consumer percentiles.
    #[serde(flatten)]
    pub latency: Latencies,
    /// Commit → the record's Kafka timestamp (producer send), median (ms).
    pub send_p50_ms: f64,
    /// 99th percentile of the same.
    pub send_p99_ms: f64,
    /// Median writer transaction (begin → commit returned), ms.
    pub commit_p50_ms: f64,
    /// The relay's child: peak RSS (KiB).
    pub relay_peak_rss_kib: u64,
    /// Batches the relay published.
    pub relay_batches: f64,
}

/// One round: both modes.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRound {
    /// 1-based.
    pub round: usize,
    /// Modes in the order they ran.
    pub order: Vec<&'static str>,
    /// With LISTEN/NOTIFY (`--compare listen`), or the exactly-once relay
    /// (`--compare delivery`).
    pub first: ModeFigures,
    /// Polling only (`--compare listen`), or the at-least-once relay
    /// (`--compare delivery`).
    pub second: ModeFigures,
}

/// The report of `herald-bench relay-latency`.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    /// Settings.
    pub setup: serde_json::Map<String, Value>,
    /// Every round.
    pub rounds: Vec<LatencyRound>,
    /// Lines under the table.
    pub notes: Vec<String>,
    poll_interval_ms: u64,
    compare: LatencyCompare,
}

impl LatencyReport {
    fn median_of(&self, f: impl Fn(&LatencyRound) -> f64) -> f64 {
        median_by(&self.rounds, f)
    }

    /// The final line.
    pub fn summary_line(&self) -> String {
        let rounds = format!("median of {}", rounds(self.rounds.len()));
        match self.compare {
            LatencyCompare::Listen => format!(
                "relay-latency: commit→consumer p50 {:.1} ms, p99 {:.1} ms with LISTEN/NOTIFY; p50 {:.1} ms, p99 {:.1} ms polling every {} ms (commit→Kafka timestamp p50 {:.1} / {:.1} ms; {rounds})",
                self.median_of(|r| r.first.latency.p50_ms),
                self.median_of(|r| r.first.latency.p99_ms),
                self.median_of(|r| r.second.latency.p50_ms),
                self.median_of(|r| r.second.latency.p99_ms),
                self.poll_interval_ms,
                self.median_of(|r| r.first.send_p50_ms),
                self.median_of(|r| r.second.send_p50_ms),
            ),
            LatencyCompare::Delivery => {
                let (exactly, at_least) = (
                    self.median_of(|r| r.first.latency.p99_ms),
                    self.median_of(|r| r.second.latency.p99_ms),
                );
                format!(
                    "relay-latency: commit→read_committed consumer p50 {:.1} ms, p99 {exactly:.1} ms exactly once; p50 {:.1} ms, p99 {at_least:.1} ms at least once; p99 ratio {:.2} (goal ≤ 2.00: {}; {rounds})",
                    self.median_of(|r| r.first.latency.p50_ms),
                    self.median_of(|r| r.second.latency.p50_ms),
                    exactly / at_least,
                    met(exactly <= 2.0 * at_least),
                )
            }
        }
    }
}

impl Report for LatencyReport {
    fn table(&self) -> String {
        let mut out = format!("relay-latency: {}\n", setup_line(&self.setup));
        out.push_str(&format!(
            "{:>5}  {:<8} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9}\n",
            "round",
            "mode",
            "events",
            "rate/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "send p50",
            "send p99",
            "commit p50",
            "relay RSS"
        ));
        for r in &self.rounds {
            for (side, f) in [(Side::Herald, &r.first), (Side::Bare, &r.second)] {
                let name = self.compare.mode_name(side);
                out.push_str(&format!(
                    "{:>5}  {:<8} {:>7} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>10.1} {:>9}\n",
                    r.round,
                    name,
                    f.events,
                    per_second(f.written_rate),
                    f.latency.p50_ms,
                    f.latency.p90_ms,
                    f.latency.p99_ms,
                    f.latency.max_ms,
                    f.send_p50_ms,
                    f.send_p99_ms,
                    f.commit_p50_ms,
                    mib(f.relay_peak_rss_kib),
                ));
            }
        }
        finish_table(&mut out, &self.notes, &self.summary_line());
        out
    }

    fn json(&self) -> Value {
        json!({
            "bench": "relay-latency",
            "setup": self.setup,
            "rounds": self.rounds,
            "notes": self.notes,
            "summary_line": self.summary_line(),
        })
    }
}

/// Runs the rounds and returns the report.
pub async fn run(
    args: &RelayLatencyArgs,
    resources: &RunResources,
) -> anyhow::Result<LatencyReport> {
    let db = &BenchDatabase::create(&args.db, resources, true).await?;
    let mut setup = serde_json::Map::new();
    setup.insert("rate".into(), json!(args.rate));
    setup.insert("seconds".into(), json!(args.seconds));
    setup.insert("warmup_secs".into(), json!(args.warmup_secs));
    setup.insert("poll_interval_ms".into(), json!(args.poll_interval_ms));
    setup.insert("relay_batch".into(), json!(args.relay_batch));
    setup.insert("relay_workers".into(), json!(args.relay_workers));
    setup.insert("writers".into(), json!(args.writers));
    setup.insert("payload_bytes".into(), json!(args.payload_bytes));
    setup.insert("partitions".into(), json!(args.partitions));
    setup.insert("keys".into(), json!(args.keys));
    setup.insert("brokers".into(), json!(args.brokers));
    setup.insert("compare".into(), json!(args.compare));
    let durability = db.describe(&mut setup).await?;
    let mut report = LatencyReport {
        setup,
        rounds: Vec::new(),
        notes: vec![
            durability,
            "latency = consumer receive − writer's commit returned (one wall clock); send = the record's Kafka CreateTime (relay's producer, ms) − commit".to_owned(),
            match args.compare {
                LatencyCompare::Listen => format!(
                    "listen: PgOutbox::listen(true), the relay wakes on the commit's NOTIFY; poll: PgOutbox::listen(false), an idle relay sleeps poll_interval {} ms",
                    args.poll_interval_ms
                ),
                LatencyCompare::Delivery => "exactly: TransactionalRelay (a Kafka transaction per batch, with its checkpoint; synchronous lease commits); at-least: Relay (asynchronous marks); both listen".to_owned(),
            },
        ],
        poll_interval_ms: args.poll_interval_ms,
        compare: args.compare,
    };
    let workload = Workload::new(args.payload_bytes, args.keys, u64::MAX / 2)?;
    let writers = database::pool(db.url(), args.writers).await?;
    let mut next_seq = 0u64;
    for round in 0..args.rounds {
        let [first, second] = both_sides(round, async |side| {
            let mode = args.compare.mode_name(side);
            db.execute("TRUNCATE herald_outbox, herald_outbox_pending")
                .await?;
            let topic = resources
                .topic(&format!("lat-r{}-{mode}", round + 1), args.partitions)
                .await?;
            let mut spec = SideSpec {
                args: args.clone(),
                topic: topic.clone(),
                listen: args.compare == LatencyCompare::Delivery || side == Side::Herald,
                checkpoint_topic: None,
                transactional_id_prefix: resources.name(&format!("lat-r{}-relay", round + 1)),
            };
            if args.compare == LatencyCompare::Delivery && side == Side::Herald {
                let checkpoints = resources
                    .topic(
                        &format!("lat-r{}-checkpoints", round + 1),
                        i32::from(herald_postgres::RELAY_SLOTS),
                    )
                    .await?;
                spec.checkpoint_topic = Some(checkpoints);
            }
            let measured = measure_mode(
                args,
                resources,
                db,
                &writers,
                &workload,
                spec,
                &mut next_seq,
            )
            .await
            .with_context(|| format!("round {} {mode}", round + 1))?;
            progress(format!(
                "relay-latency round {} {mode}: {} events, p50 {:.1} ms, p99 {:.1} ms",
                round + 1,
                measured.events,
                measured.latency.p50_ms,
                measured.latency.p99_ms
            ));
            Ok(measured)
        })
        .await?;
        report.rounds.push(LatencyRound {
            round: round + 1,
            order: round_order(round)
                .iter()
                .map(|s| args.compare.mode_name(*s))
                .collect(),
            first,
            second,
        });
    }
    writers.close().await;
    Ok(report)
}

/// What a writer did for one event.
struct Commit {
    event_id: Uuid,
    measured: bool,
    committed: SystemTime,
    transaction: Duration,
}

async fn measure_mode(
    args: &RelayLatencyArgs,
    resources: &RunResources,
    db: &BenchDatabase,
    writers: &sqlx::PgPool,
    workload: &Workload,
    spec: SideSpec,
    next_seq: &mut u64,
) -> anyhow::Result<ModeFigures> {
    let topic = spec.topic.clone();
    let reader = ArrivalReader::start(&args.brokers, resources, &topic, args.partitions)?;
    let relay = spawn_side(
        &AnySide::RelayLatency(spec),
        args.side_timeout_secs,
        &[(CHILD_DATABASE_URL, db.url())],
    )?;
    let schedule = OpenLoop::new(
        args.rate,
        Duration::from_secs(args.warmup_secs),
        args.measured(),
    );
    // Polling mode needs up to one poll interval after the last commit.
    let grace = Duration::from_millis(args.poll_interval_ms);
    let run = schedule.run(reader, relay, "the relay", grace, |measured| {
        let record = OutboxRecord::new(&topic, &workload.event(*next_seq), SOURCE, None)
            .context("encoding an event")?;
        *next_seq += 1;
        let pool = writers.clone();
        Ok(async move {
            let began = Instant::now();
            let mut tx = pool
                .begin()
                .await
                .map_err(StoreError::db("beginning a writer transaction"))?;
            enqueue(&mut tx, &record).await?;
            tx.commit()
                .await
                .map_err(StoreError::db("committing a writer transaction"))?;
            let committed = SystemTime::now();
            anyhow::Ok(Commit {
                event_id: record.envelope.event_id,
                measured,
                committed,
                transaction: began.elapsed(),
            })
        })
    });
    Ok(figures(run.await?))
}

fn figures(run: Measured<Commit>) -> ModeFigures {
    let by_id: HashMap<Uuid, &Arrival> = run.arrivals.iter().map(|a| (a.event_id, a)).collect();
    let mut latencies = Vec::new();
    let mut sends = Vec::new();
    let mut transactions = Vec::new();
    let mut missing = 0;
    let mut measured = 0;
    for commit in run.writes.iter().filter(|c| c.measured) {
        measured += 1;
        transactions.push(commit.transaction.as_secs_f64() * 1000.0);
        let Some(arrival) = by_id.get(&commit.event_id) else {
            missing += 1;
            continue;
        };
        latencies.push(millis_between(commit.committed, arrival.received));
        if let Some(created) = arrival.create_time_ms {
            let committed_ms = millis_between(SystemTime::UNIX_EPOCH, commit.committed);
            sends.push(created as f64 - committed_ms);
        }
    }
    for values in [&mut latencies, &mut sends, &mut transactions] {
        values.sort_by(f64::total_cmp);
    }
    let sends = Latencies::of(&sends);
    ModeFigures {
        events: latencies.len() as u64,
        missing,
        written_rate: rate(measured, run.window),
        latency: Latencies::of(&latencies),
        send_p50_ms: sends.p50_ms,
        send_p99_ms: sends.p99_ms,
        commit_p50_ms: Latencies::of(&transactions).p50_ms,
        relay_peak_rss_kib: run.side.peak_rss_kib,
        relay_batches: run.side.extra.get("batches").copied().unwrap_or_default(),
    }
}

/// Runs the relay of one mode in this (child) process until stdin closes.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let args = &spec.args;
    // One connection per worker, and the listener's.
    let pool = child_pool(u32::try_from(args.relay_workers + 1).unwrap_or(u32::MAX)).await?;
    let publisher = Publisher::new(&PublisherConfig::new(&args.brokers, SOURCE))?;
    learn_topic(publisher.producer().client(), &spec.topic)?;
    let config = RelayConfig {
        batch_size: args.relay_batch,
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        workers: args.relay_workers,
        ..RelayConfig::default()
    };
    let started = Instant::now();
    let relay = AnyRelay::new(
        PgOutbox::new(pool).listen(spec.listen),
        publisher.clone(),
        &args.brokers,
        config,
        spec.checkpoint_topic.as_deref(),
        &spec.transactional_id_prefix,
    )
    .await?;
    let stats = relay.stats();
    relay.run(stdin_closed()).await;
    let seconds = started.elapsed().as_secs_f64();
    Ok(SideResult::finish(stats.published(), seconds)?
        .with("batches", stats.batches() as f64)
        .with("publish_failures", stats.publish_failures() as f64)
        .with("store_failures", stats.store_failures() as f64))
}
