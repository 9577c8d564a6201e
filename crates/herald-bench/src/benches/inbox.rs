//! `herald-bench inbox`: the cost of exactly-once effects. herald's consumer
//! runtime handles one pre-produced topic three ways, each side in its own
//! child process and fresh consumer group, with the same handler effect —
//! one `INSERT` into `herald_bench_effects` per event:
//!
//! - `inbox-batched`: the effect and the inbox row through
//!   [`Inbox::batched`] (concurrent events share one transaction, a
//!   savepoint each), as the `orders` service runs its consumers;
//! - `inbox-unbatched`: the same through [`Inbox::new`] (one transaction per
//!   event: inbox row + effect);
//! - `no-inbox`: the baseline, the effect alone in its own transaction, no
//!   inbox row (at-least-once).
//!
//! Ratios are to `no-inbox`. Each side is timed from its first handled
//! record to its last (joining the group is not measured). Between sides the
//! parent empties the effect and inbox tables, so every side starts from
//! the same state. The sides rotate their order from round to round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use herald::HandlerError;
use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use herald_postgres::{classify, Inbox};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::consumer::{pre_produce, Probe};
use super::SideSpec as AnySide;
use crate::shared::child::{run_side_with_env, SideResult};
use crate::shared::database::{child_pool, BenchDatabase, DbArgs, CHILD_DATABASE_URL};
use crate::shared::report::{SideComparison, SideInfo, SidesRound};
use crate::shared::stats::{per_second, rotation};
use crate::shared::topics::RunResources;
use crate::shared::workload::BenchEvent;
use crate::shared::{progress, CommonArgs};

/// Flags of `herald-bench inbox`.
#[derive(Debug, Clone, Args)]
pub struct InboxArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Keys the runtime handles in parallel (`ConsumerConfig::concurrency`);
    /// also the most events an `Inbox::batched` transaction takes.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Records received but unfinished before the runtime pauses fetching.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// How long `Inbox::batched` waits for a batch to fill, in ms.
    #[arg(long, default_value_t = 2)]
    pub batch_wait_ms: u64,
    /// Database connections per side (the `orders` default).
    #[arg(long, default_value_t = 20)]
    pub db_pool: u32,
}

/// How a side applies the effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `Inbox::batched`.
    Batched,
    /// `Inbox::new`.
    Unbatched,
    /// The effect in its own transaction, no inbox.
    Plain,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Batched, Mode::Unbatched, Mode::Plain];

    fn name(self) -> &'static str {
        match self {
            Mode::Batched => "inbox-batched",
            Mode::Unbatched => "inbox-unbatched",
            Mode::Plain => "no-inbox",
        }
    }
}

/// One side of the inbox benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    mode: Mode,
    brokers: String,
    topic: String,
    group: String,
    records: u64,
    concurrency: usize,
    max_in_flight: usize,
    batch_wait_ms: u64,
    db_pool: u32,
}

const EFFECT_TABLE: &str = "CREATE TABLE IF NOT EXISTS herald_bench_effects (
    event_id UUID PRIMARY KEY,
    record_key TEXT NOT NULL,
    seq BIGINT NOT NULL
)";

const EFFECT: &str =
    "INSERT INTO herald_bench_effects (event_id, record_key, seq) VALUES ($1, $2, $3)";

/// Runs the rounds and returns the comparison.
pub async fn run(
    args: &InboxArgs,
    resources: &RunResources,
    db: &BenchDatabase,
) -> anyhow::Result<SideComparison> {
    let common = &args.common;
    common.validate()?;
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.db_pool > 0, "--db-pool must be at least 1");
    let durability = db.durability().await?;
    db.execute(EFFECT_TABLE).await?;
    let topic = resources.topic("inbox", common.partitions).await?;
    let produced = pre_produce(common, &topic).await?;
    progress(format!(
        "inbox: pre-produced {} records to {topic} at {} rec/s",
        common.records,
        per_second(produced)
    ));
    let mut setup = common.setup();
    setup.insert("concurrency".into(), json!(args.concurrency));
    setup.insert("max_in_flight".into(), json!(args.max_in_flight));
    setup.insert("batch_wait_ms".into(), json!(args.batch_wait_ms));
    setup.insert("db_pool".into(), json!(args.db_pool));
    setup.insert("database".into(), json!(db.name()));
    setup.insert(
        "synchronous_commit".into(),
        json!(durability.synchronous_commit),
    );
    setup.insert("fsync".into(), json!(durability.fsync));
    let describe = |mode: Mode| {
        match mode {
        Mode::Batched => format!(
            "herald Consumer + Inbox::batched (≤ {} events per transaction, {} ms wait, a savepoint each): inbox row + 1 INSERT",
            args.concurrency, args.batch_wait_ms
        ),
        Mode::Unbatched => {
            "herald Consumer + Inbox::new (one transaction per event): inbox row + 1 INSERT".to_owned()
        }
        Mode::Plain => {
            "herald Consumer, the same INSERT in its own transaction, no inbox row (baseline)".to_owned()
        }
    }
    };
    let mut comparison = SideComparison {
        bench: "inbox",
        sides: Mode::ALL
            .iter()
            .map(|m| SideInfo {
                name: m.name().to_owned(),
                description: describe(*m),
            })
            .collect(),
        baseline: Mode::Plain.name().to_owned(),
        goal: None,
        setup,
        rounds: Vec::new(),
        notes: vec![
            format!("PostgreSQL: {}", durability.describe()),
            format!(
                "all sides: herald consumer runtime, concurrency {}, max_in_flight {}, CONSUMER_DEFAULTS, {} pooled connections",
                args.concurrency, args.max_in_flight, args.db_pool
            ),
        ],
    };
    for round in 0..common.rounds {
        let order: Vec<Mode> = rotation(Mode::ALL.len(), round)
            .into_iter()
            .map(|i| Mode::ALL[i])
            .collect();
        let mut this_round = SidesRound::start(round, order.iter().map(|m| m.name()));
        for mode in &order {
            db.execute("TRUNCATE herald_bench_effects, herald_inbox")
                .await?;
            let spec = SideSpec {
                mode: *mode,
                brokers: common.brokers.clone(),
                topic: topic.clone(),
                group: resources.group(&format!("inbox-r{}-{}", round + 1, mode.name())),
                records: common.records,
                concurrency: args.concurrency,
                max_in_flight: args.max_in_flight,
                batch_wait_ms: args.batch_wait_ms,
                db_pool: args.db_pool,
            };
            let result = run_side_with_env(
                &AnySide::Inbox(spec),
                common.side_timeout_secs,
                &[(CHILD_DATABASE_URL, db.url())],
            )
            .await?;
            let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_bench_effects")
                .fetch_one(db.pool())
                .await
                .context("counting effects")?;
            ensure!(
                effects as u64 == common.records,
                "{}: {effects} effects for {} records",
                mode.name(),
                common.records
            );
            this_round.add("inbox", mode.name(), result);
        }
        comparison.rounds.push(this_round);
    }
    Ok(comparison)
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let pool = child_pool(spec.db_pool).await?;
    let probe = Arc::new(Probe::new(spec.records));
    let inbox = match spec.mode {
        Mode::Batched => Some(Inbox::batched(
            pool.clone(),
            spec.group.clone(),
            spec.concurrency,
            Duration::from_millis(spec.batch_wait_ms),
        )),
        Mode::Unbatched => Some(Inbox::new(pool.clone(), spec.group.clone())),
        Mode::Plain => None,
    };
    let handler_probe = Arc::clone(&probe);
    let router = Router::new().handle(
        spec.mode.name(),
        move |event: BenchEvent, record: RecordInfo| {
            let (probe, inbox, pool) = (Arc::clone(&handler_probe), inbox.clone(), pool.clone());
            async move {
                let BenchEvent::BenchRecord(event) = event;
                let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
                match inbox {
                    Some(inbox) => {
                        inbox
                            .apply(record.envelope.event_id, async move |conn| {
                                sqlx::query(EFFECT)
                                    .bind(event.event_id)
                                    .bind(&event.key)
                                    .bind(seq)
                                    .execute(&mut *conn)
                                    .await
                                    .map_err(classify)?;
                                Ok(())
                            })
                            .await?;
                    }
                    None => {
                        let mut tx = pool.begin().await.map_err(classify)?;
                        sqlx::query(EFFECT)
                            .bind(event.event_id)
                            .bind(&event.key)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await
                            .map_err(classify)?;
                        tx.commit().await.map_err(classify)?;
                    }
                }
                probe.hit();
                Ok::<(), HandlerError>(())
            }
        },
    );
    let config = ConsumerConfig::new(&spec.brokers, &spec.group, [&spec.topic])
        .concurrency(spec.concurrency)
        .max_in_flight(spec.max_in_flight);
    let consumer = Consumer::new(config, router)?;
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
    let seconds = last.duration_since(*first).as_secs_f64();
    Ok(SideResult::finish(spec.records, seconds)?
        .with(
            "startup_seconds",
            first.duration_since(started).as_secs_f64(),
        )
        .with("consumed", stats.consumed() as f64)
        .with("handled", stats.handled() as f64)
        .with("dead_lettered", stats.dead_lettered() as f64)
        .with("commit_failures", stats.commit_failures() as f64))
}
