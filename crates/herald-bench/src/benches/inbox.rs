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
//! - `offsets-batched`: [`Inbox::batched`] keeping the consumer's offsets
//!   instead of a row per event ([`Dedupe::Offsets`], the consumer started
//!   from them: `ConsumerConfig::offsets_in`);
//! - `no-inbox`: the baseline, the effect alone in its own transaction, no
//!   inbox row (at-least-once).
//!
//! Ratios are to `no-inbox`. Each side is timed from its first handled
//! record to its last (joining the group is not measured). Between sides the
//! parent empties the effect and inbox tables, so every side starts from
//! the same state. The sides rotate their order from round to round.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;
use herald::HandlerError;
use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use herald_postgres::{classify, Dedupe, Inbox};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;

use super::SideSpec as AnySide;
use crate::shared::child::{run_side as run_child, SideResult};
use crate::shared::consume::{consume, Probe};
use crate::shared::database::{child_pool, BenchDatabase, DbArgs, CHILD_DATABASE_URL};
use crate::shared::report::{SideComparison, Sides};
use crate::shared::topics::RunResources;
use crate::shared::workload::{filled_topic, BenchEvent, BenchRecord};
use crate::shared::CommonArgs;

/// Flags of `herald-bench inbox`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct InboxArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    // Never sent to a child: the admin URL carries a password.
    #[command(flatten)]
    #[serde(skip)]
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
    /// `Inbox::batched` with `Dedupe::Offsets`.
    Offsets,
    /// The effect in its own transaction, no inbox.
    Plain,
}

impl Sides for Mode {
    const ALL: &'static [Self] = &[Mode::Batched, Mode::Unbatched, Mode::Offsets, Mode::Plain];

    fn name(self) -> &'static str {
        match self {
            Mode::Batched => "inbox-batched",
            Mode::Unbatched => "inbox-unbatched",
            Mode::Offsets => "offsets-batched",
            Mode::Plain => "no-inbox",
        }
    }
}

/// One side of the inbox benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    args: InboxArgs,
    mode: Mode,
    topic: String,
    group: String,
}

const EFFECT_TABLE: &str = "CREATE TABLE IF NOT EXISTS herald_bench_effects (
    event_id UUID PRIMARY KEY,
    record_key TEXT NOT NULL,
    seq BIGINT NOT NULL
)";

const EFFECT: &str =
    "INSERT INTO herald_bench_effects (event_id, record_key, seq) VALUES ($1, $2, $3)";

/// Runs the rounds and returns the comparison.
pub async fn run(args: &InboxArgs, resources: &RunResources) -> anyhow::Result<SideComparison> {
    let db = &BenchDatabase::create(&args.db, resources, true).await?;
    let common = &args.common;
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.db_pool > 0, "--db-pool must be at least 1");
    let mut setup = common.setup();
    setup.insert("concurrency".into(), json!(args.concurrency));
    setup.insert("max_in_flight".into(), json!(args.max_in_flight));
    setup.insert("batch_wait_ms".into(), json!(args.batch_wait_ms));
    setup.insert("db_pool".into(), json!(args.db_pool));
    let durability = db.describe(&mut setup).await?;
    db.execute(EFFECT_TABLE).await?;
    let topic = filled_topic("inbox", "inbox", common, resources).await?;
    let describe = |mode| {
        match mode {
        Mode::Batched => format!(
            "herald Consumer + Inbox::batched (≤ {} events per transaction, {} ms wait, a savepoint each): inbox row + 1 INSERT",
            args.concurrency, args.batch_wait_ms
        ),
        Mode::Unbatched => {
            "herald Consumer + Inbox::new (one transaction per event): inbox row + 1 INSERT".to_owned()
        }
        Mode::Offsets => format!(
            "herald Consumer::offsets_in + Inbox::batched(Dedupe::Offsets) (≤ {} events per transaction, {} ms wait): a row per partition + 1 INSERT",
            args.concurrency, args.batch_wait_ms
        ),
        Mode::Plain => {
            "herald Consumer, the same INSERT in its own transaction, no inbox row (baseline)".to_owned()
        }
    }
    };
    let notes = vec![
        durability,
        format!(
            "all sides: herald consumer runtime, concurrency {}, max_in_flight {}, CONSUMER_DEFAULTS, {} pooled connections",
            args.concurrency, args.max_in_flight, args.db_pool
        ),
    ];
    let mut comparison = SideComparison::new("inbox", Mode::Plain, describe, setup, notes);
    comparison
        .run_rounds(common.rounds, async |round, mode: Mode| {
            db.execute("TRUNCATE herald_bench_effects, herald_inbox, herald_consumer_offsets")
                .await?;
            let spec = SideSpec {
                args: args.clone(),
                mode,
                topic: topic.clone(),
                group: resources.group(&format!("inbox-r{}-{}", round + 1, mode.name())),
            };
            let result = run_child(
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
            Ok(result)
        })
        .await?;
    Ok(comparison)
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let (args, records) = (&spec.args, spec.args.common.records);
    let pool = child_pool(args.db_pool).await?;
    let probe = Arc::new(Probe::new(records));
    let batched = || {
        Inbox::batched(
            pool.clone(),
            spec.group.clone(),
            args.concurrency,
            Duration::from_millis(args.batch_wait_ms),
        )
    };
    let inbox = match spec.mode {
        Mode::Batched => Some(batched()),
        Mode::Offsets => Some(batched().dedupe(Dedupe::Offsets)),
        Mode::Unbatched => Some(Inbox::new(pool.clone(), spec.group.clone())),
        Mode::Plain => None,
    };
    let offsets = inbox.clone().filter(|_| spec.mode == Mode::Offsets);
    let handler_probe = Arc::clone(&probe);
    let router = Router::new().handle(
        spec.mode.name(),
        move |event: BenchEvent, record: RecordInfo| {
            let (probe, inbox, pool) = (Arc::clone(&handler_probe), inbox.clone(), pool.clone());
            async move {
                let BenchEvent::BenchRecord(event) = event;
                match inbox {
                    Some(inbox) => {
                        inbox
                            .apply_at(
                                record.envelope.event_id,
                                record.position(),
                                async move |conn| effect(conn, &event).await,
                            )
                            .await?;
                    }
                    None => {
                        let mut tx = pool.begin().await.map_err(classify)?;
                        effect(&mut tx, &event).await?;
                        tx.commit().await.map_err(classify)?;
                    }
                }
                probe.hit();
                Ok::<(), HandlerError>(())
            }
        },
    );
    let mut config = ConsumerConfig::new(&args.common.brokers, &spec.group, [&spec.topic])
        .concurrency(args.concurrency)
        .max_in_flight(args.max_in_flight);
    if let Some(offsets) = offsets {
        config = config.offsets_in(offsets);
    }
    consume(Consumer::new(config, router)?, &probe, records).await
}

/// The handler's effect: one INSERT.
async fn effect(conn: &mut PgConnection, event: &BenchRecord) -> Result<(), HandlerError> {
    sqlx::query(EFFECT)
        .bind(event.event_id)
        .bind(&event.key)
        .bind(i64::try_from(event.seq).unwrap_or(i64::MAX))
        .execute(conn)
        .await
        .map_err(classify)?;
    Ok(())
}
