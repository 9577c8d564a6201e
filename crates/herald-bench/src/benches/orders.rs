//! `herald-bench orders`: the reference service end to end, with every
//! guarantee on (transactional outbox, idempotent relay, inbox-guarded
//! consumers) against PostgreSQL's own ceiling on the same database.
//!
//! Each round starts `orders run` (the binary built with `cargo build
//! --release -p orders`, or `--orders-bin`) as a child process on the run's
//! fresh database, with fresh random topics and consumer groups
//! (`ORDERS_EVENTS_TOPIC`, `ORDERS_FULFILLMENT_TOPIC`, `ORDERS_GROUP_PREFIX`)
//! and the API on a free port (`HTTP_ADDR`); waits for `/readyz`; runs the
//! service's own load generator (`orders load --orders N --concurrency C
//! --api URL`) and parses its final line (`N orders in S s: X orders/s,
//! POST→read-model p50 A ms, p95 B ms, p99 C ms`); reads the service's peak
//! RSS and stops it with SIGTERM. In the same round, with the service
//! stopped, `pgbench -n -f script.sql -c C -T S` (8 clients unless
//! `--pgbench-clients`) inserts one order row and its outbox row per
//! transaction on the same database: the rate at which this server commits
//! the least a durable order with a transactional outbox needs, the
//! ceiling. The two alternate from round
//! to round; the ratio is orders/s ÷ pgbench TPS.
//!
//! Per load, the report also has where the work went (issue #15): CPU ms
//! per order of the service, of PostgreSQL and of the broker (from
//! `/proc`, [`CpuSnapshot`]), and PostgreSQL commits and rows written per
//! order (`pg_stat_database`, read after the service's backends ended).
//! After the saturated load, each `--paced-rates` rate (default 50 orders/s
//! and half the round's saturated rate) runs on a fresh service for
//! `--paced-secs`, for the latency at those rates.
//!
//! Authentication is on as in production (`--auth jwt`, the default): each
//! round generates a random HS256 secret and gives it to the service and to
//! `orders load` (in `ORDERS_JWT_SECRET`, off the command line), which
//! mints one token per synthetic customer. `--auth none` runs without, for
//! comparison.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use herald_test::log_tail;
use orders::api::auth::AuthMode;

use crate::shared::build;
use crate::shared::child::peak_rss_kib_of;
use crate::shared::cpu::CpuSnapshot;
use crate::shared::database::{libpq_env, BenchDatabase, DbArgs};
use crate::shared::progress;
use crate::shared::report::{both_sides, finish_table, rounds, setup_line, Report};
use crate::shared::stats::{median_by, mib, peak_by, per_second, ratio, round_order, Side};
use crate::shared::topics::RunResources;

/// Flags of `herald-bench orders`.
#[derive(Debug, Clone, Args)]
pub struct OrdersArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = herald_test::DEFAULT_KAFKA_BROKERS)]
    pub brokers: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Orders `orders load` posts per round.
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,
    /// Requests in flight (`orders load --concurrency`).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Target orders per second (`orders load --rate`; 0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// pgbench clients.
    #[arg(long, default_value_t = 8)]
    pub pgbench_clients: usize,
    /// Seconds pgbench runs.
    #[arg(long, default_value_t = 20)]
    pub pgbench_secs: u64,
    /// Partitions of the service's topics (`ORDERS_TOPIC_PARTITIONS`).
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Rounds; each runs the service and pgbench once, the order alternating.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// The `orders` binary [default: build it with `cargo build --release -p
    /// orders` into this binary's target directory and use that].
    #[arg(long)]
    pub orders_bin: Option<PathBuf>,
    /// Give up when the read model lacks orders after this many seconds
    /// (`orders load --timeout-secs`).
    #[arg(long, default_value_t = 600)]
    pub load_timeout_secs: u64,
    /// The service's authentication: `jwt` (a random HS256 secret per
    /// round, tokens minted by `orders load`) or `none`.
    #[arg(long, value_enum, default_value_t = AuthMode::Jwt)]
    pub auth: AuthMode,
    /// Paced runs after the saturated one, each on a fresh service, comma
    /// separated: orders per second, or `half` (half the round's saturated
    /// rate). `none` (or empty) for none.
    #[arg(long, default_value = "50,half")]
    pub paced_rates: PacedRates,
    /// Seconds each paced run lasts (its orders = rate × seconds).
    #[arg(long, default_value_t = 10)]
    pub paced_secs: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The rate of a paced run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum PacedRate {
    /// Orders per second.
    Fixed(u32),
    /// Half the round's saturated rate.
    HalfOfSaturated,
}

impl std::str::FromStr for PacedRate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "half" => Ok(Self::HalfOfSaturated),
            number => match number.parse::<u32>() {
                Ok(rate) if rate > 0 => Ok(Self::Fixed(rate)),
                _ => Err(format!(
                    "{text:?} is not a paced rate: orders per second (at least 1) or `half`"
                )),
            },
        }
    }
}

/// The `--paced-rates` list.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PacedRates(pub Vec<PacedRate>);

impl std::str::FromStr for PacedRates {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" | "none" => Ok(Self::default()),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map(Self),
        }
    }
}

impl PacedRate {
    /// Orders per second, given the round's saturated rate.
    fn resolve(self, saturated: f64) -> u32 {
        match self {
            Self::Fixed(rate) => rate,
            // At least 1 order per second, so a run always has orders.
            Self::HalfOfSaturated => ((saturated / 2.0).round() as u32).max(1),
        }
    }
}

/// A random HS256 secret: 32 bytes as 64 hex digits.
fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment variable that carries the secret to both sides.
const SECRET_ENV: &str = "ORDERS_JWT_SECRET";

/// Authentication settings of the caller's environment that would change
/// how the children authenticate: removed, the benchmark sets its own.
const AUTH_ENV: &[&str] = &[
    "ORDERS_AUTH",
    "ORDERS_JWT_SECRET",
    "ORDERS_JWT_PUBLIC_KEY",
    "ORDERS_JWT_PRIVATE_KEY",
    "ORDERS_JWT_ISSUER",
    "ORDERS_JWT_AUDIENCE",
];

impl OrdersArgs {
    /// Rejects values the benchmark cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.orders > 0, "--orders must be at least 1");
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.pgbench_secs > 0, "--pgbench-secs must be at least 1");
        ensure!(self.rounds > 0, "--rounds must be at least 1");
        ensure!(
            self.paced_rates.0.is_empty() || self.paced_secs > 0,
            "--paced-secs must be at least 1"
        );
        ensure!(
            self.pgbench_clients > 0,
            "--pgbench-clients must be at least 1"
        );
        Ok(())
    }

    fn clients(&self) -> usize {
        self.pgbench_clients
    }
}

/// What `orders load` reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadFigures {
    /// Orders created.
    pub orders: u64,
    /// First POST to the last order in the read model (s).
    pub seconds: f64,
    /// Orders per second.
    pub rate: f64,
    /// POST → read model, median (ms).
    pub p50_ms: f64,
    /// 95th percentile (ms).
    pub p95_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// The service's peak RSS (KiB), read before it was stopped.
    #[serde(default)]
    pub peak_rss_kib: u64,
    /// CPU ms per order over the load, per process group (`service`,
    /// `postgres`, `broker`).
    #[serde(default)]
    pub cpu_ms_per_order: std::collections::BTreeMap<&'static str, f64>,
    /// PostgreSQL commits per order in the benchmark's database, from the
    /// load's start to the service's stop.
    #[serde(default)]
    pub commits_per_order: f64,
    /// Rows inserted, updated or deleted per order, over the same span.
    #[serde(default)]
    pub rows_per_order: f64,
    /// Kafka transactions committed per order over the load: the
    /// exactly-once relay's batches plus the fulfillment processor's
    /// transactions, from the service's own `/metrics`.
    #[serde(default)]
    pub kafka_transactions_per_order: f64,
    /// Statements PostgreSQL ran in the benchmark's database per order
    /// (`pg_stat_statements`), and the costliest of them; empty when the
    /// server does not count statements.
    #[serde(default)]
    pub statements: Option<StatementFigures>,
    /// The line as printed.
    pub line: String,
    /// How the load generator ran.
    pub via: String,
}

/// Statements per order over a load, from `pg_stat_statements`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatementFigures {
    /// Statements executed per order (every kind: the service's, the
    /// load generator's reads, BEGIN and COMMIT).
    pub per_order: f64,
    /// The statements that took the most server time, most first.
    pub top: Vec<StatementCost>,
}

/// One statement's share of a load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatementCost {
    /// Executions per order.
    pub calls_per_order: f64,
    /// Planning and execution time per order (ms).
    pub ms_per_order: f64,
    /// The statement's normalized text, shortened.
    pub query: String,
}

/// What pgbench reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgbenchFigures {
    /// Transactions per second (without the initial connection time).
    pub tps: f64,
    /// Mean transaction latency (ms).
    pub latency_avg_ms: f64,
    /// Transactions processed.
    pub transactions: u64,
    /// Clients.
    pub clients: usize,
    /// Seconds.
    pub seconds: u64,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct OrdersRound {
    /// 1-based.
    pub round: usize,
    /// `orders` and `pgbench` in the order they ran.
    pub order: Vec<&'static str>,
    /// The service, saturated.
    pub orders: LoadFigures,
    /// The paced runs: target rate and figures.
    pub paced: Vec<(u32, LoadFigures)>,
    /// The ceiling.
    pub pgbench: PgbenchFigures,
    /// orders/s ÷ pgbench TPS.
    pub ratio: f64,
}

/// The report of `herald-bench orders`.
#[derive(Debug, Clone, Serialize)]
pub struct OrdersReport {
    /// Settings.
    pub setup: serde_json::Map<String, Value>,
    /// Every round.
    pub rounds: Vec<OrdersRound>,
    /// Lines under the table.
    pub notes: Vec<String>,
}

impl OrdersReport {
    fn median_of(&self, f: impl Fn(&OrdersRound) -> f64) -> f64 {
        median_by(&self.rounds, f)
    }

    /// The final line.
    pub fn summary_line(&self) -> String {
        let clients = self.rounds.first().map_or(0, |r| r.pgbench.clients);
        let cpu = |group: &str| {
            self.median_of(|r| r.orders.cpu_ms_per_order.get(group).copied().unwrap_or(0.0))
        };
        // Paced runs by their place in --paced-rates (their rates may differ
        // per round: `half`).
        let paced_runs = self.rounds.first().map_or(0, |r| r.paced.len());
        let paced: String = (0..paced_runs)
            .map(|i| {
                let at = |r: &OrdersRound| r.paced.get(i).map_or(0.0, |(rate, _)| f64::from(*rate));
                format!(
                    "; paced at {:.0}/s p50 {:.1} ms, p99 {:.1} ms",
                    self.median_of(at),
                    self.median_of(|r| r.paced.get(i).map_or(0.0, |(_, p)| p.p50_ms)),
                    self.median_of(|r| r.paced.get(i).map_or(0.0, |(_, p)| p.p99_ms)),
                )
            })
            .collect();
        format!(
            "orders: {} orders/s end to end (POST→read-model p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms{paced}); CPU ms per order: orders {:.2}, postgres {:.2}, broker {:.2}; commits per order {:.2}; statements per order {:.1}; Kafka transactions per order {:.2}; pgbench one order + outbox INSERT per transaction {} TPS ({clients} clients); ratio {:.3} (median of {}); orders peak RSS {}",
            per_second(self.median_of(|r| r.orders.rate)),
            self.median_of(|r| r.orders.p50_ms),
            self.median_of(|r| r.orders.p95_ms),
            self.median_of(|r| r.orders.p99_ms),
            cpu("service"),
            cpu("postgres"),
            cpu("broker"),
            self.median_of(|r| r.orders.commits_per_order),
            self.median_of(|r| r.orders.statements.as_ref().map_or(0.0, |s| s.per_order)),
            self.median_of(|r| r.orders.kafka_transactions_per_order),
            per_second(self.median_of(|r| r.pgbench.tps)),
            self.median_of(|r| r.ratio),
            rounds(self.rounds.len()),
            mib(peak_by(&self.rounds, |r| r.orders.peak_rss_kib)),
        )
    }
}

impl Report for OrdersReport {
    fn table(&self) -> String {
        let mut out = format!("orders: {}\n", setup_line(&self.setup));
        out.push_str(&format!(
            "{:>5}  {:<15} {:>8} {:>10} {:>8} {:>8} {:>8} {:>12} {:>10} {:>7} {:>9}\n",
            "round",
            "order",
            "orders",
            "orders/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "pgbench TPS",
            "pg lat ms",
            "ratio",
            "RSS"
        ));
        for r in &self.rounds {
            out.push_str(&format!(
                "{:>5}  {:<15} {:>8} {:>10} {:>8.0} {:>8.0} {:>8.0} {:>12} {:>10.2} {:>7.3} {:>9}\n",
                r.round,
                r.order.join(","),
                r.orders.orders,
                per_second(r.orders.rate),
                r.orders.p50_ms,
                r.orders.p95_ms,
                r.orders.p99_ms,
                per_second(r.pgbench.tps),
                r.pgbench.latency_avg_ms,
                r.ratio,
                mib(r.orders.peak_rss_kib),
            ));
        }
        for r in &self.rounds {
            out.push_str(&format!(
                "  round {} load ({}): {}\n",
                r.round, r.orders.via, r.orders.line
            ));
            out.push_str(&format!(
                "  round {} saturated, per order: {}\n",
                r.round,
                per_order(&r.orders)
            ));
            if let Some(statements) = &r.orders.statements {
                for cost in &statements.top {
                    out.push_str(&format!(
                        "  round {} saturated, costliest statements per order: {:.2} calls, {:.3} ms: {}\n",
                        r.round, cost.calls_per_order, cost.ms_per_order, cost.query
                    ));
                }
            }
            for (rate, paced) in &r.paced {
                out.push_str(&format!(
                    "  round {} paced at {rate}/s: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; per order: {}\n",
                    r.round,
                    paced.p50_ms,
                    paced.p95_ms,
                    paced.p99_ms,
                    per_order(paced)
                ));
            }
        }
        finish_table(&mut out, &self.notes, &self.summary_line());
        out
    }

    fn json(&self) -> Value {
        json!({
            "bench": "orders",
            "setup": self.setup,
            "rounds": self.rounds,
            "notes": self.notes,
            "summary_line": self.summary_line(),
        })
    }
}

/// A load's CPU per process group and database writes, per order.
fn per_order(figures: &LoadFigures) -> String {
    let cpu = |group: &str| figures.cpu_ms_per_order.get(group).copied().unwrap_or(0.0);
    format!(
        "CPU ms orders {:.2}, postgres {:.2}, broker {:.2}; commits {:.2}, rows written {:.2}, Kafka transactions {:.2}",
        cpu("service"),
        cpu("postgres"),
        cpu("broker"),
        figures.commits_per_order,
        figures.rows_per_order,
        figures.kafka_transactions_per_order
    ) + &figures
        .statements
        .as_ref()
        .map_or_else(String::new, |s| format!(", statements {:.1}", s.per_order))
}

/// The ceiling's tables: an order row and an outbox row of about the
/// service's sizes (its own tables may not exist yet when pgbench runs
/// first).
const CEILING_TABLES: [&str; 2] = [
    "CREATE TABLE herald_bench_ceiling_orders (
    id UUID PRIMARY KEY,
    customer_id UUID NOT NULL,
    status TEXT NOT NULL,
    total_cents BIGINT NOT NULL,
    items JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)",
    "CREATE TABLE herald_bench_ceiling_outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)",
];

/// One order and its outbox row per transaction: the least a durable
/// order write with a transactional outbox commits (issue #15's ceiling).
const CEILING_SCRIPT: &str = "\\set k random(1, 1000000000)
BEGIN;
INSERT INTO herald_bench_ceiling_orders (id, customer_id, status, total_cents, items) VALUES (gen_random_uuid(), gen_random_uuid(), 'placed', :k, '[{\"sku\":\"sku-1\",\"quantity\":2,\"unit_cents\":1250}]');
INSERT INTO herald_bench_ceiling_outbox (aggregate_id, event_type, payload) VALUES (:k::text, 'OrderPlaced', repeat('x', 256));
COMMIT;
";

/// Runs the rounds and returns the report.
pub async fn run(args: &OrdersArgs, resources: &RunResources) -> anyhow::Result<OrdersReport> {
    // The orders service applies its own migrations.
    let db = &BenchDatabase::create(&args.db, resources, false).await?;
    let binary = match &args.orders_bin {
        Some(path) => path.clone(),
        None => build::workspace_binary("orders")
            .await
            .context("building orders (or pass --orders-bin)")?,
    };
    ensure!(
        binary.is_file(),
        "no orders binary at {} (build it: cargo build --release -p orders, or pass --orders-bin)",
        binary.display()
    );
    let scratch = std::env::temp_dir().join(format!("herald-bench-{}", resources.run_id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let outcome = run_rounds(args, resources, db, &binary, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}

async fn run_rounds(
    args: &OrdersArgs,
    resources: &RunResources,
    db: &BenchDatabase,
    binary: &Path,
    scratch: &Path,
) -> anyhow::Result<OrdersReport> {
    for table in CEILING_TABLES {
        db.execute(table).await?;
    }
    let script = scratch.join("order-and-outbox.sql");
    std::fs::write(&script, CEILING_SCRIPT)
        .with_context(|| format!("writing {}", script.display()))?;
    let mut setup = serde_json::Map::new();
    setup.insert("orders".into(), json!(args.orders));
    setup.insert("concurrency".into(), json!(args.concurrency));
    setup.insert("rate".into(), json!(args.rate));
    setup.insert("pgbench_clients".into(), json!(args.clients()));
    setup.insert("pgbench_secs".into(), json!(args.pgbench_secs));
    setup.insert("partitions".into(), json!(args.partitions));
    setup.insert("brokers".into(), json!(args.brokers));
    setup.insert("orders_bin".into(), json!(binary.display().to_string()));
    setup.insert(
        "auth".into(),
        json!(match args.auth {
            AuthMode::Jwt => "jwt (HS256)",
            AuthMode::None => "none",
        }),
    );
    let durability = db.describe(&mut setup).await?;
    let mut report = OrdersReport {
        setup,
        rounds: Vec::new(),
        notes: vec![
            durability,
            format!(
                "orders: `orders run` (every component in one process: API, outbox relay, inbox-guarded consumers, ...), driven by `orders load`; latency = POST sent → read model's projected_at; auth {}",
                match args.auth {
                    AuthMode::Jwt => "jwt (a random HS256 secret per round, one bearer token per synthetic customer)",
                    AuthMode::None => "none",
                }
            ),
            format!(
                "ceiling: pgbench -n -f order-and-outbox.sql -c {} -T {} on the same database, one order row and one outbox row (256-byte payload) per transaction, the service stopped",
                args.clients(),
                args.pgbench_secs
            ),
            "each service first carries 20 orders at 20/s end to end (warm-up, not measured); per order: CPU from /proc over the load (orders = the service's pid, postgres = every `postgres` process, broker = every `java` process), ÷ orders; commits and rows written from pg_stat_database, from the load's start to the service's stop (its backends ended)".to_owned(),
        ],
    };
    for round in 0..args.rounds {
        let sides = both_sides(round, async |side| {
            Ok(match side {
                Side::Herald => {
                    let load = Load {
                        name: format!("r{}", round + 1),
                        orders: args.orders,
                        rate: args.rate,
                    };
                    let figures = run_service(args, resources, db, binary, scratch, &load)
                        .await
                        .with_context(|| format!("round {} orders", round + 1))?;
                    progress(format!("orders round {}: {}", round + 1, figures.line));
                    (Some(figures), None)
                }
                Side::Bare => {
                    let figures = pgbench(args, db, &script).await?;
                    progress(format!(
                        "orders round {}: pgbench {} TPS, latency average {:.2} ms",
                        round + 1,
                        per_second(figures.tps),
                        figures.latency_avg_ms
                    ));
                    (None, Some(figures))
                }
            })
        });
        let [(Some(orders), _), (_, Some(pgbench))] = sides.await? else {
            bail!("round {} is missing a side", round + 1);
        };
        let mut paced = Vec::new();
        for rate in &args.paced_rates.0 {
            let rate = rate.resolve(orders.rate);
            let load = Load {
                name: format!("r{}-p{rate}", round + 1),
                orders: usize::try_from(u64::from(rate) * args.paced_secs).unwrap_or(usize::MAX),
                rate,
            };
            let figures = run_service(args, resources, db, binary, scratch, &load)
                .await
                .with_context(|| format!("round {} paced at {rate} orders/s", round + 1))?;
            progress(format!(
                "orders round {} paced at {rate}/s: {}",
                round + 1,
                figures.line
            ));
            paced.push((rate, figures));
        }
        report.rounds.push(OrdersRound {
            round: round + 1,
            order: round_order(round)
                .iter()
                .map(|s| match s {
                    Side::Herald => "orders",
                    Side::Bare => "pgbench",
                })
                .collect(),
            ratio: ratio(orders.rate, pgbench.tps),
            orders,
            paced,
            pgbench,
        });
    }
    Ok(report)
}

/// One load of the service: `orders` orders at `rate` per second (0: as
/// fast as it goes), on a service whose topics and groups are named after
/// `name`.
struct Load {
    name: String,
    orders: usize,
    rate: u32,
}

/// The load each service gets before the measured one.
const WARM_UP: Load = Load {
    name: String::new(),
    orders: 20,
    rate: 20,
};

/// Starts `orders run`, loads it, stops it; with the CPU each process
/// group used per order and the database's commits per order.
async fn run_service(
    args: &OrdersArgs,
    resources: &RunResources,
    db: &BenchDatabase,
    binary: &Path,
    scratch: &Path,
    run: &Load,
) -> anyhow::Result<LoadFigures> {
    let name = &run.name;
    // Every topic and group the service makes carries this prefix.
    resources.adopt_prefix(&resources.name(&format!("{name}-")));
    let events = resources.name(&format!("{name}-order-events"));
    let prefix = resources.name(&format!("{name}-orders"));
    let port = herald_test::free_port();
    let log_path = scratch.join(format!("orders-{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let secret = (args.auth == AuthMode::Jwt).then(random_secret);
    let mut service = Command::new(binary);
    for key in AUTH_ENV {
        service.env_remove(key);
    }
    match &secret {
        Some(secret) => service.env("ORDERS_AUTH", "jwt").env(SECRET_ENV, secret),
        None => service.env("ORDERS_AUTH", "none"),
    };
    let mut service = service
        .arg("run")
        .env("KAFKA_BROKERS", &args.brokers)
        .env("DATABASE_URL", db.url())
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERS_EVENTS_TOPIC", &events)
        .env(
            "ORDERS_FULFILLMENT_TOPIC",
            resources.name(&format!("{name}-fulfillment-events")),
        )
        .env("ORDERS_GROUP_PREFIX", &prefix)
        .env("ORDERS_TOPIC_PARTITIONS", args.partitions.to_string())
        .env("ORDERS_DATA_DIR", scratch.join("data"))
        .env("RUST_LOG", "warn")
        .env_remove("METRICS_ADDR")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = service.id().context("the service exited at once")?;
    let outcome = async {
        wait_ready(&mut service, port, &log_path).await?;
        // Ready answers before every consumer group has its partitions: a
        // few orders carried end to end first keep the joins out of the
        // figures (of the paced runs above all, which are short).
        load(args, &WARM_UP, binary, port, secret.as_deref())
            .await
            .context("warming the service up")?;
        let writes_before = DatabaseWrites::read(db).await?;
        let statements_before = StatementCounts::read(db).await;
        let transactions_before = kafka_transactions(port).await?;
        let cpu_before = CpuSnapshot::take(pid);
        let mut figures = load(args, run, binary, port, secret.as_deref()).await?;
        figures.cpu_ms_per_order = CpuSnapshot::take(pid).per(&cpu_before, figures.orders);
        figures.kafka_transactions_per_order =
            (kafka_transactions(port).await? - transactions_before) / figures.orders.max(1) as f64;
        figures.peak_rss_kib = peak_rss_kib_of(pid).unwrap_or(0);
        anyhow::Ok((figures, writes_before, statements_before))
    }
    .await;
    stop(&mut service, pid).await;
    let (mut figures, writes_before, statements_before) = outcome.map_err(|e| {
        e.context(format!(
            "service log {}:\n{}",
            log_path.display(),
            log_tail(&log_path, 20)
        ))
    })?;
    // A backend flushes its statistics when it ends: wait for the
    // service's to end before reading them.
    db.wait_for_other_sessions_to_end(Duration::from_secs(30))
        .await?;
    let writes = DatabaseWrites::read(db).await?;
    let orders = figures.orders.max(1) as f64;
    figures.commits_per_order = (writes.commits - writes_before.commits) as f64 / orders;
    figures.rows_per_order = (writes.rows - writes_before.rows) as f64 / orders;
    if let (Some(before), Some(after)) = (statements_before, StatementCounts::read(db).await) {
        figures.statements = Some(after.since(&before, orders));
    }
    Ok(figures)
}

/// The Kafka transactions the service has committed so far: its relay's
/// batches and its fulfillment processor's transactions (`/metrics`).
async fn kafka_transactions(port: u16) -> anyhow::Result<f64> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("scraping the service's /metrics")?
        .text()
        .await
        .context("reading the service's /metrics")?;
    Ok(counter_sum(&text, "herald_relay_batches_total")
        + counter_sum(&text, "herald_processor_transactions_committed_total"))
}

/// The sum of every sample of metric `name` in a Prometheus text exposition.
fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Statements run in the benchmark's database so far, by `queryid`
/// (`pg_stat_statements`): executions, server time (ms) and text.
struct StatementCounts(HashMap<i64, (i64, f64, String)>);

/// Statements listed in the report.
const TOP_STATEMENTS: usize = 8;

impl StatementCounts {
    /// `None` when the server does not count statements (the extension or
    /// its preloaded library missing: a server not started by
    /// `scripts/services.sh`).
    async fn read(db: &BenchDatabase) -> Option<Self> {
        let rows: Vec<(Option<i64>, i64, f64, String)> = sqlx::query_as(
            "SELECT queryid, calls, total_plan_time + total_exec_time, query FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(db.pool())
        .await
        .map_err(|e| progress(format!("orders: no statement counts ({e})")))
        .ok()?;
        Some(Self(
            rows.into_iter()
                .filter_map(|(id, calls, ms, query)| Some((id?, (calls, ms, query))))
                .collect(),
        ))
    }

    /// What ran between `before` and this reading, per order.
    fn since(&self, before: &Self, orders: f64) -> StatementFigures {
        let mut costs: Vec<StatementCost> = self
            .0
            .iter()
            .filter_map(|(id, (calls, ms, query))| {
                let (calls_before, ms_before) = before.0.get(id).map_or((0, 0.0), |b| (b.0, b.1));
                let calls = calls - calls_before;
                (calls > 0).then(|| StatementCost {
                    calls_per_order: calls as f64 / orders,
                    ms_per_order: (ms - ms_before) / orders,
                    query: shorten(query),
                })
            })
            .collect();
        let per_order = costs.iter().map(|c| c.calls_per_order).sum();
        costs.sort_by(|a, b| b.ms_per_order.total_cmp(&a.ms_per_order));
        costs.truncate(TOP_STATEMENTS);
        StatementFigures {
            per_order,
            top: costs,
        }
    }
}

/// A statement's text on one line, at most 100 characters.
fn shorten(query: &str) -> String {
    let line = query.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(100) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

/// The database's commits and written rows so far (`pg_stat_database`).
struct DatabaseWrites {
    commits: i64,
    rows: i64,
}

impl DatabaseWrites {
    async fn read(db: &BenchDatabase) -> anyhow::Result<Self> {
        let (commits, rows): (i64, i64) = sqlx::query_as(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(db.pool())
        .await
        .context("reading pg_stat_database")?;
        Ok(Self { commits, rows })
    }
}

/// Waits until the service answers `GET /readyz` with 200 (each try
/// bounded to 5 s), failing when it exits or after 120 s.
async fn wait_ready(service: &mut Child, port: u16, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let client = reqwest::Client::new();
    loop {
        if let Some(status) = service.try_wait()? {
            bail!(
                "orders run exited ({status}) before it was ready:\n{}",
                log_tail(log, 20)
            );
        }
        let answer = client
            .get(&readyz)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("orders run not ready after 120 s:\n{}", log_tail(log, 20));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM, then up to 30 s for a clean stop, then SIGKILL.
async fn stop(service: &mut Child, pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    match tokio::time::timeout(Duration::from_secs(30), service.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => progress(format!("orders run exited with {status}")),
        Ok(Err(error)) => progress(format!("waiting for orders run: {error}")),
        Err(_) => {
            progress("orders run did not stop within 30 s; killing it");
            let _ = service.kill().await;
        }
    }
}

/// Runs the service's load generator, the `orders load` command; with
/// `secret`, it mints its customers' tokens with it.
async fn load(
    args: &OrdersArgs,
    run: &Load,
    binary: &Path,
    port: u16,
    secret: Option<&str>,
) -> anyhow::Result<LoadFigures> {
    let api = format!("http://127.0.0.1:{port}");
    let mut command = Command::new(binary);
    for key in AUTH_ENV {
        command.env_remove(key);
    }
    if let Some(secret) = secret {
        command.env(SECRET_ENV, secret);
    }
    command
        .arg("load")
        .args(["--orders", &run.orders.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--api", &api])
        .args(["--timeout-secs", &args.load_timeout_secs.to_string()])
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if run.rate > 0 {
        command.args(["--rate", &run.rate.to_string()]);
    }
    let output = command.output().await.context("running orders load")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "orders load failed ({}): {stdout}{stderr}",
        output.status,
    );
    stdout
        .lines()
        .rev()
        .find_map(parse_load_line)
        .with_context(|| format!("orders load printed no summary line: {stdout}"))
}

/// Parses `N orders in S s: X orders/s, POST→read-model p50 A ms, p95 B ms,
/// p99 C ms`.
pub fn parse_load_line(line: &str) -> Option<LoadFigures> {
    let line = line.trim();
    let (orders, rest) = line.split_once(" orders in ")?;
    let (seconds, rest) = rest.split_once(" s: ")?;
    let (rate, rest) = rest.split_once(" orders/s")?;
    let after = |key: &str| -> Option<f64> {
        let start = rest.find(key)? + key.len();
        rest[start..].split_whitespace().next()?.parse().ok()
    };
    Some(LoadFigures {
        orders: orders.trim().parse().ok()?,
        seconds: seconds.trim().parse().ok()?,
        rate: rate.trim().parse().ok()?,
        p50_ms: after("p50 ")?,
        p95_ms: after("p95 ")?,
        p99_ms: after("p99 ")?,
        peak_rss_kib: 0,
        cpu_ms_per_order: std::collections::BTreeMap::new(),
        commits_per_order: 0.0,
        rows_per_order: 0.0,
        kafka_transactions_per_order: 0.0,
        statements: None,
        line: line.to_owned(),
        via: "orders load (command)".to_owned(),
    })
}

async fn pgbench(
    args: &OrdersArgs,
    db: &BenchDatabase,
    script: &Path,
) -> anyhow::Result<PgbenchFigures> {
    let clients = args.clients();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(clients);
    let mut command = Command::new("pgbench");
    command
        .args(["-n", "-f"])
        .arg(script)
        .args(["-c", &clients.to_string()])
        .args(["-j", &threads.to_string()])
        .args(["-T", &args.pgbench_secs.to_string()])
        .env("PGAPPNAME", crate::shared::database::APPLICATION_NAME)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, value) in libpq_env(db.url())? {
        command.env(key, value);
    }
    let output = command
        .output()
        .await
        .context("running pgbench (installed with PostgreSQL)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "pgbench failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_pgbench(&stdout, clients, args.pgbench_secs)
        .with_context(|| format!("pgbench printed no tps line: {stdout}"))
}

/// Reads `tps = …`, `latency average = … ms` and `number of transactions
/// actually processed: …` from pgbench's output.
pub fn parse_pgbench(output: &str, clients: usize, seconds: u64) -> Option<PgbenchFigures> {
    let value = |prefix: &str| -> Option<&str> {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
    };
    Some(PgbenchFigures {
        tps: value("tps = ")?.parse().ok()?,
        latency_avg_ms: value("latency average = ")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        transactions: value("number of transactions actually processed: ")
            .and_then(|v| v.split('/').next()?.parse().ok())
            .unwrap_or(0),
        clients,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_load_line() {
        let line =
            "2000 orders in 3.1 s: 645 orders/s, POST→read-model p50 12 ms, p95 30 ms, p99 41 ms";
        let figures = parse_load_line(line).expect("parsed");
        assert_eq!(figures.orders, 2000);
        assert_eq!(figures.seconds, 3.1);
        assert_eq!(figures.rate, 645.0);
        assert_eq!(
            (figures.p50_ms, figures.p95_ms, figures.p99_ms),
            (12.0, 30.0, 41.0)
        );
        assert!(parse_load_line("posting [====]").is_none());
    }

    #[test]
    fn shortens_statements_to_one_line() {
        assert_eq!(
            shorten("SELECT 1\n  FROM t\tWHERE x = $1"),
            "SELECT 1 FROM t WHERE x = $1"
        );
        let long = "x".repeat(150);
        assert_eq!(shorten(&long).chars().count(), 101);
    }

    #[test]
    fn sums_a_counter_over_its_labels() {
        let text = "# HELP herald_relay_batches Relay batches.
# TYPE herald_relay_batches counter
herald_relay_batches_total{worker=\"0\"} 3
herald_relay_batches_total{worker=\"1\"} 4.5
herald_relay_batches_total_other 100
herald_processor_transactions_committed_total 2
";
        assert_eq!(counter_sum(text, "herald_relay_batches_total"), 7.5);
        assert_eq!(
            counter_sum(text, "herald_processor_transactions_committed_total"),
            2.0
        );
        assert_eq!(counter_sum(text, "missing_total"), 0.0);
    }

    #[test]
    fn parses_paced_rates() {
        let rate = |text: &str| text.parse::<PacedRate>();
        assert_eq!(rate("50"), Ok(PacedRate::Fixed(50)));
        assert_eq!(rate("half"), Ok(PacedRate::HalfOfSaturated));
        assert!(rate("0").is_err() && rate("fast").is_err());
        assert_eq!(PacedRate::HalfOfSaturated.resolve(431.0), 216);
        assert_eq!(PacedRate::HalfOfSaturated.resolve(0.4), 1);
        assert_eq!(PacedRate::Fixed(50).resolve(431.0), 50);
        let rates = |text: &str| text.parse::<PacedRates>().map(|r| r.0);
        assert_eq!(
            rates("50,half"),
            Ok(vec![PacedRate::Fixed(50), PacedRate::HalfOfSaturated])
        );
        assert_eq!(rates(""), Ok(vec![]));
        assert_eq!(rates("none"), Ok(vec![]));
        assert!(rates("50,,half").is_err());
    }

    #[test]
    fn parses_pgbench_output() {
        let output = "transaction type: one-insert.sql\nscaling factor: 1\nquery mode: simple\nnumber of clients: 32\nnumber of threads: 2\nmaximum number of tries: 1\nduration: 20 s\nnumber of transactions actually processed: 46913\nnumber of failed transactions: 0 (0.000%)\nlatency average = 13.640 ms\ninitial connection time = 40.1 ms\ntps = 2345.678901 (without initial connection time)\n";
        let figures = parse_pgbench(output, 32, 20).expect("parsed");
        assert_eq!(figures.tps, 2345.678901);
        assert_eq!(figures.latency_avg_ms, 13.64);
        assert_eq!(figures.transactions, 46913);
    }
}
