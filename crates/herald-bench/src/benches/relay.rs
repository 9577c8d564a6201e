//! `herald-bench relay`: herald's outbox relay (by default the exactly-once
//! [`TransactionalRelay::drain`] over [`PgOutbox`]; `--delivery
//! at-least-once` for [`Relay::drain`]) emptying a pre-filled outbox into
//! Kafka, against the bare [`Publisher::publish_records`] sending the same
//! records (same keys, bodies and headers) to the same broker, in the same
//! run.
//!
//! `--baseline at-least-once` compares the two relays instead: the
//! exactly-once relay ÷ the at-least-once relay, each draining the same
//! pre-filled outbox (filled anew, identically, before each side), goal
//! ≥ 0.7 ([`GOAL_VS_AT_LEAST_ONCE`]).
//!
//! Each round the parent empties the outbox of the run's fresh database,
//! fills it with `--records` events (multi-row [`enqueue_all`] in
//! transactions of `--fill-batch`; timed apart, not part of the
//! measurement), runs `VACUUM (ANALYZE)` so the relay's queries are planned
//! on real statistics, and starts the relay side: a child that drains the
//! outbox to its own fresh topic, timed from the first claim to the pass
//! that finds the outbox empty. The bare side, in its own child, publishes
//! the same number of records of the same shape to its own fresh topic in
//! `publish_records` calls of `--publish-batch`, timed over the calls (the
//! records of a call are encoded before its clock starts, as the relay's
//! were encoded at enqueue). Both producers use herald's
//! `PRODUCER_DEFAULTS` and learn the topic's metadata before the clock.
//!
//! The ceiling (skip it with `--no-store-ceiling`): each round the outbox is
//! filled once more and drained by the store alone — `PgOutbox` claims and
//! marks with the relay's batch size and workers, and nothing is published.
//! The relay does all of that work plus the publisher's, on the same cores
//! as PostgreSQL and Kafka, so the store's own drain rate bounds the relay:
//! if both kinds of work share the CPU, the relay's ratio to the bare
//! publisher cannot exceed `store / (store + bare)`, which the report
//! prints.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use herald::{Envelope, OutboxBatch as _, OutboxStore as _};
use herald_kafka::{
    ExactlyOnceConfig, OutgoingRecord, Publisher, PublisherConfig, Relay, RelayConfig, RelayStats,
    TransactionalRelay,
};
use herald_postgres::outbox::{enqueue_all, status};
use herald_postgres::{AfterPublish, OutboxRecord, PgOutbox, StoreError};
use rdkafka::producer::Producer as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::SideSpec as AnySide;
use crate::shared::child::{run_side as run_child, SideResult};
use crate::shared::database::{child_pool, BenchDatabase, DbArgs, CHILD_DATABASE_URL};
use crate::shared::report::{Comparison, Round};
use crate::shared::stats::{per_second, rate, Side};
use crate::shared::topics::{learn_topic, RunResources};
use crate::shared::workload::{Workload, SOURCE};
use crate::shared::{progress, CommonArgs};

/// The ratio the relay should reach against the bare publisher.
pub const GOAL: f64 = 0.5;

/// The ratio the exactly-once relay should reach against the at-least-once
/// relay on the same outbox.
pub const GOAL_VS_AT_LEAST_ONCE: f64 = 0.7;

/// Which relay the herald side runs (`--delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryArg {
    /// `TransactionalRelay` (the default of `orders` on real Kafka).
    ExactlyOnce,
    /// `Relay`.
    AtLeastOnce,
}

/// What the herald side is compared with (`--baseline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayBaseline {
    /// The bare publisher sending records of the same shape.
    Bare,
    /// The at-least-once relay draining the same outbox.
    AtLeastOnce,
}

/// What a side's child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SideMode {
    /// Drains the outbox with a relay.
    Relay(DeliveryArg),
    /// Claims and marks without publishing (the ceiling).
    StoreOnly,
    /// Publishes records of the same shape with the bare publisher.
    BarePublisher,
}

/// What the relay does with a published row (`PgOutbox::after_publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterPublishArg {
    /// Set `published_at` (the default of `PgOutbox`).
    Mark,
    /// Delete the row.
    Delete,
}

impl AfterPublishArg {
    fn store(self) -> AfterPublish {
        match self {
            AfterPublishArg::Mark => AfterPublish::MarkPublished,
            AfterPublishArg::Delete => AfterPublish::Delete,
        }
    }
}

/// Flags of `herald-bench relay`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RelayArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    // Never sent to a child: the admin URL carries a password.
    #[command(flatten)]
    #[serde(skip)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Rows the relay claims per pass (`RelayConfig::batch_size`).
    #[arg(long, default_value_t = RelayConfig::default().batch_size)]
    pub relay_batch: usize,
    /// Relay workers, each with its own claim transaction
    /// (`RelayConfig::workers`).
    #[arg(long, default_value_t = RelayConfig::default().workers)]
    pub relay_workers: usize,
    /// What the relay does with published rows.
    #[arg(long, value_enum, default_value_t = AfterPublishArg::Mark)]
    pub after_publish: AfterPublishArg,
    /// Make the relay's marks wait for their WAL flush
    /// (`PgOutbox::synchronous_marks`; off by default, as in `PgOutbox`).
    #[arg(long)]
    pub synchronous_marks: bool,
    /// Records per `publish_records` call of the bare publisher.
    #[arg(long, default_value_t = 10_000)]
    pub publish_batch: usize,
    /// Outbox rows per fill transaction (one multi-row `enqueue_all`).
    #[arg(long, default_value_t = 1_000)]
    pub fill_batch: usize,
    /// Fill transactions in flight (capped so that no two concurrent ones
    /// write the same key).
    #[arg(long, default_value_t = 4)]
    pub fill_concurrency: usize,
    /// Skip the ceiling: the outbox drained by the store alone, without
    /// Kafka.
    #[arg(long)]
    pub no_store_ceiling: bool,
    /// The relay the herald side runs.
    #[arg(long, value_enum, default_value_t = DeliveryArg::ExactlyOnce)]
    pub delivery: DeliveryArg,
    /// The other side: the bare publisher, or the at-least-once relay
    /// (then the herald side is the exactly-once relay).
    #[arg(long, value_enum, default_value_t = RelayBaseline::Bare)]
    pub baseline: RelayBaseline,
}

impl RelayArgs {
    /// What `side` runs.
    fn mode(&self, side: Side) -> SideMode {
        match (side, self.baseline) {
            (Side::Herald, RelayBaseline::AtLeastOnce) => SideMode::Relay(DeliveryArg::ExactlyOnce),
            (Side::Herald, RelayBaseline::Bare) => SideMode::Relay(self.delivery),
            (Side::Bare, RelayBaseline::AtLeastOnce) => SideMode::Relay(DeliveryArg::AtLeastOnce),
            (Side::Bare, RelayBaseline::Bare) => SideMode::BarePublisher,
        }
    }

    fn describe(&self, mode: SideMode) -> String {
        let marks = if self.synchronous_marks {
            "synchronous"
        } else {
            "asynchronous"
        };
        match mode {
            SideMode::Relay(DeliveryArg::ExactlyOnce) => format!(
                "herald TransactionalRelay::drain over PgOutbox (batch {}, {} workers, {:?} after publish, synchronous lease commits), pre-filled outbox → Kafka transactions",
                self.relay_batch, self.relay_workers, self.after_publish
            ),
            SideMode::Relay(DeliveryArg::AtLeastOnce) => format!(
                "herald Relay::drain over PgOutbox (batch {}, {} workers, {:?} after publish, {marks} marks), pre-filled outbox → Kafka, PRODUCER_DEFAULTS",
                self.relay_batch, self.relay_workers, self.after_publish
            ),
            SideMode::StoreOnly => "store alone (PgOutbox claim → mark, no Kafka)".to_owned(),
            SideMode::BarePublisher => format!(
                "herald Publisher::publish_records, {} records per call, same keys, bodies and headers, PRODUCER_DEFAULTS",
                self.publish_batch
            ),
        }
    }
}

/// One side of the relay benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    args: RelayArgs,
    mode: SideMode,
    topic: String,
    /// Exactly once: the relay's checkpoint topic and transactional ids.
    checkpoint_topic: Option<String>,
    transactional_id_prefix: String,
}

/// Runs the rounds and returns the comparison.
pub async fn run(args: &RelayArgs, resources: &RunResources) -> anyhow::Result<Comparison> {
    let db = &BenchDatabase::create(&args.db, resources, true).await?;
    let common = &args.common;
    ensure!(args.relay_batch > 0, "--relay-batch must be at least 1");
    ensure!(args.publish_batch > 0, "--publish-batch must be at least 1");
    ensure!(args.fill_batch > 0, "--fill-batch must be at least 1");
    let workload = common.workload()?;
    let mut setup = common.setup();
    setup.insert("relay_batch".into(), json!(args.relay_batch));
    setup.insert("relay_workers".into(), json!(args.relay_workers));
    setup.insert("after_publish".into(), json!(args.after_publish));
    setup.insert("synchronous_marks".into(), json!(args.synchronous_marks));
    setup.insert("publish_batch".into(), json!(args.publish_batch));
    setup.insert("delivery".into(), json!(args.delivery));
    setup.insert("baseline".into(), json!(args.baseline));
    setup.insert("fill_batch".into(), json!(args.fill_batch));
    let durability = db.describe(&mut setup).await?;
    let vs_relay = args.baseline == RelayBaseline::AtLeastOnce;
    let mut comparison = Comparison {
        bench: "relay",
        herald_side: args.describe(args.mode(Side::Herald)),
        bare_side: args.describe(args.mode(Side::Bare)),
        goal: if vs_relay {
            GOAL_VS_AT_LEAST_ONCE
        } else {
            GOAL
        },
        ceiling: (!args.no_store_ceiling && !vs_relay).then(|| args.describe(SideMode::StoreOnly)),
        setup,
        rounds: Vec::new(),
        notes: vec![durability],
    };
    let mut fills = Vec::new();
    for round in 0..common.rounds {
        let mut figures = Round::run("relay", round, async |side| {
            let what = format!("relay-r{}-{}", round + 1, side.name());
            let topic = resources.topic(&what, common.partitions).await?;
            let mode = args.mode(side);
            let mut fill_rate = None;
            if matches!(mode, SideMode::Relay(_)) {
                let filled = fill_outbox(args, db, &workload, &topic, round).await?;
                fill_rate = Some(filled);
                fills.push(filled);
            }
            let mut spec = SideSpec::new(args, topic, mode);
            if mode == SideMode::Relay(DeliveryArg::ExactlyOnce) {
                let checkpoints = resources
                    .topic(
                        &format!("{what}-checkpoints"),
                        i32::from(herald_postgres::RELAY_SLOTS),
                    )
                    .await?;
                spec.checkpoint_topic = Some(checkpoints);
            }
            let result = run_relay_side(args, db, spec).await?;
            Ok(match fill_rate {
                Some(filled) => result.with("fill_rows_per_sec", filled),
                None => result,
            })
        })
        .await?;
        if comparison.ceiling.is_some() {
            // The topic is never written: the store-only side publishes
            // nothing.
            let topic = resources
                .topic(&format!("relay-r{}-store", round + 1), 1)
                .await?;
            fill_outbox(args, db, &workload, &topic, round).await?;
            let spec = SideSpec::new(args, topic, SideMode::StoreOnly);
            let store = run_relay_side(args, db, spec).await?;
            progress(format!(
                "relay round {} store alone: {} rows/s",
                round + 1,
                per_second(store.rate())
            ));
            figures.ceiling_rate = Some(store.rate());
        }
        comparison.rounds.push(figures);
    }
    if let Some(store) = comparison.summary().ceiling_rate {
        let bare = comparison.summary().bare_rate;
        comparison.notes.push(format!(
            "store alone drains {} rows/s, {:.2}× the bare publisher: sharing the CPU, the relay's ratio is at most store / (store + bare) = {:.2}",
            per_second(store),
            store / bare,
            store / (store + bare),
        ));
    }
    let batch_ms: Vec<f64> = comparison
        .rounds
        .iter()
        .filter_map(|r| r.herald.extra.get("mean_batch_ms").copied())
        .collect();
    comparison.notes.push(format!(
        "outbox fill (not measured): {} rows/s per round, {} rows per enqueue_all transaction; relay mean batch claim→commit {} ms per round",
        fills.iter().map(|f| per_second(*f)).collect::<Vec<_>>().join(", "),
        args.fill_batch,
        batch_ms.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(", "),
    ));
    Ok(comparison)
}

impl SideSpec {
    fn new(args: &RelayArgs, topic: String, mode: SideMode) -> Self {
        SideSpec {
            args: args.clone(),
            mode,
            topic,
            checkpoint_topic: None,
            transactional_id_prefix: herald_test::unique_name("herald-bench-relay"),
        }
    }
}

/// Runs one side in a child; a side that drains the outbox must leave it
/// empty.
async fn run_relay_side(
    args: &RelayArgs,
    db: &BenchDatabase,
    spec: SideSpec,
) -> anyhow::Result<SideResult> {
    let drains = spec.mode != SideMode::BarePublisher;
    let result = run_child(
        &AnySide::Relay(spec),
        args.common.side_timeout_secs,
        &[(CHILD_DATABASE_URL, db.url())],
    )
    .await?;
    if drains {
        let backlog = status(db.pool()).await?.backlog;
        ensure!(backlog == 0, "the relay left {backlog} rows unpublished");
    }
    Ok(result)
}

/// Empties the outbox and fills it with the run's records for `topic`,
/// printing the round's progress line; returns the fill rate (rows/s).
async fn fill_outbox(
    args: &RelayArgs,
    db: &BenchDatabase,
    workload: &Workload,
    topic: &str,
    round: usize,
) -> anyhow::Result<f64> {
    db.execute("TRUNCATE herald_outbox, herald_outbox_pending")
        .await?;
    let (records, batch) = (args.common.records, args.fill_batch as u64);
    // Keys cycle in order; transactions in flight at once must not share a
    // key (they would race for its next sequence number), and `buffered`
    // starts transaction k + n only once k has finished.
    let disjoint = usize::try_from((args.common.keys / batch).max(1)).unwrap_or(usize::MAX);
    let in_flight = args.fill_concurrency.clamp(1, disjoint);
    let pool = db.pool().clone();
    let started = Instant::now();
    let mut transactions = futures::stream::iter((0..records).step_by(batch as usize))
        .map(|first| {
            let pool = pool.clone();
            async move {
                let rows = (first..(first + batch).min(records))
                    .map(|i| OutboxRecord::new(topic, &workload.event(i), SOURCE, None))
                    .collect::<Result<Vec<_>, _>>()
                    .context("encoding an event")?;
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(StoreError::db("beginning a fill transaction"))?;
                enqueue_all(&mut tx, &rows).await?;
                tx.commit()
                    .await
                    .map_err(StoreError::db("committing a fill transaction"))?;
                anyhow::Ok(())
            }
        })
        .buffered(in_flight);
    while let Some(done) = transactions.next().await {
        done?;
    }
    let filled = rate(records, started.elapsed().as_secs_f64());
    db.execute("VACUUM (ANALYZE) herald_outbox, herald_outbox_pending")
        .await?;
    progress(format!(
        "relay round {}: filled the outbox with {records} events at {} rows/s",
        round + 1,
        per_second(filled)
    ));
    Ok(filled)
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let workload = spec.args.common.workload()?;
    let publisher = Publisher::new(&PublisherConfig::new(&spec.args.common.brokers, SOURCE))?;
    learn_topic(publisher.producer().client(), &spec.topic)?;
    match spec.mode {
        SideMode::StoreOnly => store_side(&spec).await,
        SideMode::Relay(_) => relay_side(&spec, publisher.clone()).await,
        SideMode::BarePublisher => bare_side(&spec, &workload, &publisher).await,
    }
}

/// The store for a side, as the relay side configures it.
async fn side_store(spec: &SideSpec) -> anyhow::Result<PgOutbox> {
    let pool = child_pool(u32::try_from(spec.args.relay_workers).unwrap_or(u32::MAX)).await?;
    Ok(PgOutbox::new(pool)
        .after_publish(spec.args.after_publish.store())
        .synchronous_marks(spec.args.synchronous_marks))
}

/// The ceiling: the relay's store work alone, `relay_workers` loops of
/// claim → mark every claimed row, until a claim comes back empty.
async fn store_side(spec: &SideSpec) -> anyhow::Result<SideResult> {
    let store = side_store(spec).await?;
    let started = Instant::now();
    let workers = (0..spec.args.relay_workers.max(1)).map(|_| async {
        let mut marked = 0u64;
        loop {
            let batch = store.claim(spec.args.relay_batch).await?;
            let ids: Vec<i64> = batch.records().iter().map(|r| r.id).collect();
            batch.commit(&ids).await?;
            if ids.is_empty() {
                return Ok::<_, StoreError>(marked);
            }
            marked += ids.len() as u64;
        }
    });
    let mut marked = 0;
    for worker in futures::future::join_all(workers).await {
        marked += worker.context("the store failed")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let records = spec.args.common.records;
    ensure!(
        marked == records,
        "the store marked {marked} of {records} rows"
    );
    SideResult::finish(records, seconds)
}

/// A relay draining the outbox: the exactly-once relay's slot producers are
/// made (and fenced) inside the measured time, as they are when a relay
/// process starts.
async fn relay_side(spec: &SideSpec, publisher: Publisher) -> anyhow::Result<SideResult> {
    let config = RelayConfig {
        batch_size: spec.args.relay_batch,
        workers: spec.args.relay_workers,
        ..RelayConfig::default()
    };
    let relay = AnyRelay::new(
        side_store(spec).await?,
        publisher,
        &spec.args.common.brokers,
        config,
        spec.checkpoint_topic.as_deref(),
        &spec.transactional_id_prefix,
    )
    .await?;
    let stats = relay.stats();
    let started = Instant::now();
    let published = relay.drain().await?;
    relay_result(spec, &stats, published, started.elapsed().as_secs_f64())
}

/// The relay a side runs: at least once, or exactly once.
#[allow(
    clippy::large_enum_variant,
    reason = "one per process, made once and never moved in a loop"
)]
pub(crate) enum AnyRelay {
    /// `Relay`.
    AtLeastOnce(Relay<PgOutbox>),
    /// `TransactionalRelay`.
    ExactlyOnce(TransactionalRelay<PgOutbox>),
}

impl AnyRelay {
    /// The exactly-once relay on `brokers` when there is a
    /// `checkpoint_topic` (its transactional ids start with
    /// `transactional_id_prefix`), else the at-least-once relay sending
    /// through `publisher`.
    pub(crate) async fn new(
        store: PgOutbox,
        publisher: Publisher,
        brokers: &str,
        config: RelayConfig,
        checkpoint_topic: Option<&str>,
        transactional_id_prefix: &str,
    ) -> anyhow::Result<Self> {
        let Some(checkpoint_topic) = checkpoint_topic else {
            return Ok(AnyRelay::AtLeastOnce(Relay::new(store, publisher, config)));
        };
        let exactly_once = ExactlyOnceConfig {
            transactional_id_prefix: transactional_id_prefix.to_owned(),
            checkpoint_topic: checkpoint_topic.to_owned(),
            ..ExactlyOnceConfig::default()
        };
        let relay = TransactionalRelay::new(
            store,
            &PublisherConfig::new(brokers, SOURCE),
            config,
            exactly_once,
        )
        .await
        .context("starting the exactly-once relay")?;
        Ok(AnyRelay::ExactlyOnce(relay))
    }

    /// The relay's statistics.
    pub(crate) fn stats(&self) -> Arc<RelayStats> {
        match self {
            AnyRelay::AtLeastOnce(relay) => relay.stats(),
            AnyRelay::ExactlyOnce(relay) => relay.stats(),
        }
    }

    /// Publishes until the outbox is empty; how many events it published.
    async fn drain(&self) -> anyhow::Result<usize> {
        match self {
            AnyRelay::AtLeastOnce(relay) => relay.drain().await,
            AnyRelay::ExactlyOnce(relay) => relay.drain().await,
        }
        .context("the relay failed")
    }

    /// Runs the relay until `shutdown` completes.
    pub(crate) async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        match self {
            AnyRelay::AtLeastOnce(relay) => relay.run(shutdown).await,
            AnyRelay::ExactlyOnce(relay) => relay.run(shutdown).await,
        }
    }
}

/// A relay side's result and its batch figures.
fn relay_result(
    spec: &SideSpec,
    stats: &RelayStats,
    published: usize,
    seconds: f64,
) -> anyhow::Result<SideResult> {
    let records = spec.args.common.records;
    ensure!(
        published as u64 == records,
        "the relay published {published} of {records} events"
    );
    let batches = stats.batches();
    let mean_batch_ms = if batches > 0 {
        stats.batch_micros_total() as f64 / batches as f64 / 1000.0
    } else {
        0.0
    };
    Ok(SideResult::finish(records, seconds)?
        .with("batches", batches as f64)
        .with("mean_batch_ms", mean_batch_ms)
        .with("publish_failures", stats.publish_failures() as f64)
        .with("store_failures", stats.store_failures() as f64)
        .with("aborted_transactions", stats.aborted() as f64))
}

async fn bare_side(
    spec: &SideSpec,
    workload: &Workload,
    publisher: &Publisher,
) -> anyhow::Result<SideResult> {
    let (total, batch) = (spec.args.common.records, spec.args.publish_batch);
    let mut publishing = Duration::ZERO;
    let mut acknowledged = 0u64;
    for first in (0..total).step_by(batch) {
        let records = (first..(first + batch as u64).min(total))
            .map(|i| {
                Envelope::encode(&workload.event(i), SOURCE)
                    .map(|envelope| OutgoingRecord::from_envelope(&spec.topic, &envelope))
            })
            .collect::<Result<Vec<_>, _>>()
            .context("encoding an event")?;
        let started = Instant::now();
        let results = publisher
            .publish_records(records.iter().map(OutgoingRecord::borrowed))
            .await;
        publishing += started.elapsed();
        if let Some(error) = results.iter().find_map(|r| r.as_ref().err()) {
            bail!("publishing failed: {error}");
        }
        acknowledged += results.len() as u64;
    }
    ensure!(
        acknowledged == total,
        "{acknowledged} of {total} acknowledged"
    );
    SideResult::finish(total, publishing.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::workload::BenchEvent;

    #[test]
    fn both_sides_send_the_same_shape() {
        let workload = Workload::new(256, 10, 100).expect("workload");
        // The benchmark's events as the relay stores them.
        let stored = OutboxRecord::new("t", &workload.event(7), SOURCE, None).expect("encode");
        assert_eq!(stored.aggregate_type, "bench");
        let event: BenchEvent = stored.envelope.decode().expect("decode");
        let bare =
            OutgoingRecord::from_envelope("t", &Envelope::encode(&event, SOURCE).expect("encode"));
        assert_eq!(bare.payload.len(), stored.envelope.payload.len());
        assert_eq!(bare.headers.len(), stored.envelope.headers().len());
        assert_eq!(bare.key.as_deref(), Some(stored.envelope.key.as_bytes()));
    }
}
