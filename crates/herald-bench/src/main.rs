//! `herald-bench`: herald's benchmark command (DESIGN.md "Performance").
//!
//! Every figure is a ratio: herald's component against a baseline (a bare
//! rdkafka loop, the bare publisher, pgbench, ...), run side by side in the
//! same run, on the same broker, over the same records, because the machine
//! is noisy. Nothing is asserted; the goals are printed next to the measured
//! ratios. What each benchmark measures: `README.md`, and the doc of its
//! module in `benches/`.
//!
//! Each side of each round runs in its own child process (this binary
//! re-executed with a hidden `__side` subcommand), which reports its time and
//! its peak resident memory (`VmHWM`) as one JSON line. The sides alternate
//! from round to round (bare first, then herald first, ...) and the summary
//! is the median of the per-round ratios. Topics (and consumer groups) get
//! random `herald-bench-<run>-...` names and are deleted at the end; the
//! PostgreSQL benchmarks get a fresh database, dropped at the end.
//!
//! Run with: `cargo run --release -p herald-bench -- publisher` (or
//! `-- consumer`; `--records 200000` for a quicker run, `--json` for
//! machine-readable output, `--help` for every flag).
//!
//! # Layout
//! - `main.rs`: the command line and the run of one benchmark (topics,
//!   groups and database made, the benchmark run, all deleted, the report
//!   printed).
//! - `benches/`: one module per benchmark — `publisher.rs`, `consumer.rs`,
//!   `relay.rs`, `relay_latency.rs`, `inbox.rs`, `processor.rs`, `orders.rs`. Each has its
//!   flags, a `run` driving the rounds from the parent, and (when its sides
//!   are child processes of this binary) a `SideSpec` a child runs;
//!   `benches/mod.rs` routes a child's spec. A new benchmark is one more
//!   module, one more `SideSpec` variant and one more subcommand.
//! - `shared/`: the harness every benchmark uses — `stats.rs` (timing,
//!   rates, ratios, medians, percentiles, side order, number formatting),
//!   `child.rs` (child processes, peak RSS, the JSON result line),
//!   `report.rs` (the rounds of sides, their tables, summary lines and
//!   JSON), `topics.rs` (fresh topics and groups, deleted at the end),
//!   `database.rs` (a fresh PostgreSQL database per run; the server's
//!   durability settings), `workload.rs` (the benchmark event family, its
//!   byte-identical bare records, and publishing them), `consume.rs` (the
//!   consumer runtime run until it handled every record), `arrivals.rs`
//!   (the latency benchmarks' open-loop writer and reader),
//!   `kafka_perf.rs` (Kafka's ProducerPerformance ceiling). Fresh
//!   databases, topic creation, the Kafka jars, names and ports come from
//!   `herald-test`, which the tests use too.

mod benches;
mod shared;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::benches::consumer::ConsumerArgs;
use crate::benches::inbox::InboxArgs;
use crate::benches::orders::OrdersArgs;
use crate::benches::processor::ProcessorArgs;
use crate::benches::publisher::PublisherArgs;
use crate::benches::relay::RelayArgs;
use crate::benches::relay_latency::RelayLatencyArgs;
use crate::shared::child::{report, watchdog, SIDE_SUBCOMMAND};
use crate::shared::database::{BenchDatabase, DbArgs};
use crate::shared::report::Report;
use crate::shared::topics::RunResources;

/// herald's benchmarks: herald vs bare rdkafka, side by side, as ratios.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// herald Publisher throughput ÷ a bare rdkafka producer loop (goal ≥ 0.9),
    /// with Kafka's ProducerPerformance as the ceiling.
    Publisher(PublisherArgs),
    /// herald consumer runtime (no-op handler) ÷ a bare rdkafka consumer loop
    /// that stores offsets (goal ≥ 0.8).
    Consumer(ConsumerArgs),
    /// Outbox relay draining a pre-filled outbox ÷ the bare publisher on the
    /// same records (goal ≥ 0.5).
    Relay(RelayArgs),
    /// Commit → consumer latency through the relay at a steady rate, with
    /// LISTEN/NOTIFY on and off.
    RelayLatency(RelayLatencyArgs),
    /// Consumer with an inbox-guarded insert (batched, unbatched) ÷ the same
    /// insert without an inbox.
    Inbox(InboxArgs),
    /// Exactly-once Processor (transactions) ÷ the same processor at least
    /// once, and its output latency per transaction size.
    Processor(ProcessorArgs),
    /// The orders service end to end (orders/s, POST → read-model
    /// latencies) ÷ pgbench one-insert transactions on the same database.
    Orders(OrdersArgs),
    /// Runs one side in a child process (internal).
    #[command(name = SIDE_SUBCOMMAND, hide = true)]
    Side {
        /// The side's JSON spec.
        spec: String,
        /// Exit with an error after this many seconds.
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Publisher(args) => execute(Bench::Publisher(&args)).await,
        Command::Consumer(args) => execute(Bench::Consumer(&args)).await,
        Command::Relay(args) => execute(Bench::Relay(&args)).await,
        Command::RelayLatency(args) => execute(Bench::RelayLatency(&args)).await,
        Command::Inbox(args) => execute(Bench::Inbox(&args)).await,
        Command::Processor(args) => execute(Bench::Processor(&args)).await,
        Command::Orders(args) => execute(Bench::Orders(&args)).await,
        Command::Side { spec, timeout_secs } => {
            watchdog(timeout_secs);
            let spec: benches::SideSpec =
                serde_json::from_str(&spec).context("parsing the side spec")?;
            report(&spec.run().await?)
        }
    }
}

enum Bench<'a> {
    Publisher(&'a PublisherArgs),
    Consumer(&'a ConsumerArgs),
    Relay(&'a RelayArgs),
    RelayLatency(&'a RelayLatencyArgs),
    Inbox(&'a InboxArgs),
    Processor(&'a ProcessorArgs),
    Orders(&'a OrdersArgs),
}

impl Bench<'_> {
    fn brokers(&self) -> &str {
        match self {
            Bench::Publisher(args) => &args.common.brokers,
            Bench::Consumer(args) => &args.common.brokers,
            Bench::Relay(args) => &args.common.brokers,
            Bench::RelayLatency(args) => &args.brokers,
            Bench::Inbox(args) => &args.common.brokers,
            Bench::Processor(args) => &args.brokers,
            Bench::Orders(args) => &args.brokers,
        }
    }

    fn json(&self) -> bool {
        match self {
            Bench::Publisher(args) => args.common.json,
            Bench::Consumer(args) => args.common.json,
            Bench::Relay(args) => args.common.json,
            Bench::RelayLatency(args) => args.json,
            Bench::Inbox(args) => args.common.json,
            Bench::Processor(args) => args.json,
            Bench::Orders(args) => args.json,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        match self {
            Bench::Publisher(args) => args.common.validate(),
            Bench::Consumer(args) => args.common.validate(),
            Bench::Relay(args) => args.common.validate(),
            Bench::RelayLatency(args) => args.validate(),
            Bench::Inbox(args) => args.common.validate(),
            Bench::Processor(args) => args.validate(),
            Bench::Orders(args) => args.validate(),
        }
    }

    /// The database flags, and whether herald's migrations are applied to
    /// the fresh database (the orders service applies its own).
    fn database(&self) -> Option<(&DbArgs, bool)> {
        match self {
            Bench::Publisher(_) | Bench::Consumer(_) | Bench::Processor(_) => None,
            Bench::Relay(args) => Some((&args.db, true)),
            Bench::RelayLatency(args) => Some((&args.db, true)),
            Bench::Inbox(args) => Some((&args.db, true)),
            Bench::Orders(args) => Some((&args.db, false)),
        }
    }

    async fn run(
        &self,
        resources: &RunResources,
        db: Option<&BenchDatabase>,
    ) -> anyhow::Result<Box<dyn Report>> {
        let db = || db.context("this benchmark needs its database");
        Ok(match self {
            Bench::Publisher(args) => Box::new(benches::publisher::run(args, resources).await?),
            Bench::Consumer(args) => Box::new(benches::consumer::run(args, resources).await?),
            Bench::Relay(args) => Box::new(benches::relay::run(args, resources, db()?).await?),
            Bench::RelayLatency(args) => {
                Box::new(benches::relay_latency::run(args, resources, db()?).await?)
            }
            Bench::Inbox(args) => Box::new(benches::inbox::run(args, resources, db()?).await?),
            Bench::Processor(args) => Box::new(benches::processor::run(args, resources).await?),
            Bench::Orders(args) => Box::new(benches::orders::run(args, resources, db()?).await?),
        })
    }
}

/// Runs one benchmark, always deleting its topics, groups and database,
/// and prints the report.
async fn execute(bench: Bench<'_>) -> anyhow::Result<()> {
    bench.validate()?;
    let resources = RunResources::new(bench.brokers())?;
    let db = match bench.database() {
        Some((args, migrate)) => {
            let name = format!("herald_bench_{}", resources.run_id());
            Some(BenchDatabase::create(&args.database_url, &name, migrate).await?)
        }
        None => None,
    };
    let outcome = tokio::select! {
        outcome = bench.run(&resources, db.as_ref()) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Some(db) = db {
        db.drop_database().await;
    }
    resources.cleanup().await;
    let report = outcome?;
    if bench.json() {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
