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
    use benches::*;
    match Cli::parse().command {
        Command::Publisher(a) => {
            let c = &a.common;
            execute(&c.brokers, c.json, c.validate(), async |r| {
                publisher::run(&a, r).await
            })
            .await
        }
        Command::Consumer(a) => {
            let c = &a.common;
            execute(&c.brokers, c.json, c.validate(), async |r| {
                consumer::run(&a, r).await
            })
            .await
        }
        Command::Relay(a) => {
            let c = &a.common;
            execute(&c.brokers, c.json, c.validate(), async |r| {
                relay::run(&a, r).await
            })
            .await
        }
        Command::RelayLatency(a) => {
            execute(&a.brokers, a.json, a.validate(), async |r| {
                relay_latency::run(&a, r).await
            })
            .await
        }
        Command::Inbox(a) => {
            let c = &a.common;
            execute(&c.brokers, c.json, c.validate(), async |r| {
                inbox::run(&a, r).await
            })
            .await
        }
        Command::Processor(a) => {
            let c = &a.common;
            execute(&c.brokers, c.json, a.validate(), async |r| {
                processor::run(&a, r).await
            })
            .await
        }
        Command::Orders(a) => {
            execute(&a.brokers, a.json, a.validate(), async |r| {
                orders::run(&a, r).await
            })
            .await
        }
        Command::Side { spec, timeout_secs } => {
            watchdog(timeout_secs);
            let spec: SideSpec = serde_json::from_str(&spec).context("parsing the side spec")?;
            report(&spec.run().await?)
        }
    }
}

/// Runs one benchmark whose flags are `valid`, always deleting its topics,
/// groups and database (also on Ctrl-C), and prints the report.
async fn execute<R: Report>(
    brokers: &str,
    json: bool,
    valid: anyhow::Result<()>,
    run: impl AsyncFnOnce(&RunResources) -> anyhow::Result<R>,
) -> anyhow::Result<()> {
    valid?;
    let resources = RunResources::new(brokers)?;
    let outcome = tokio::select! {
        outcome = run(&resources) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    resources.cleanup().await;
    let report = outcome?;
    if json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
