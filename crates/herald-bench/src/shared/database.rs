//! Benchmark databases: one fresh PostgreSQL database per run, created
//! through the admin URL and dropped (with any connection still open to it)
//! at the end. Connections keep the server's durable defaults: nothing here
//! relaxes `synchronous_commit` (only the relay's own marks commit
//! asynchronously, `PgOutbox::synchronous_marks`, and the relay report says
//! which), and every report says what the server runs with
//! (`SHOW synchronous_commit`, `SHOW fsync`).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use herald_test::{Postgres, TestDatabase};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use super::topics::RunResources;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// The environment variable a child process reads the benchmark database's
/// URL from (kept off the command line, which `ps` shows).
pub const CHILD_DATABASE_URL: &str = "HERALD_BENCH_DATABASE_URL";

/// Flags of the benchmarks that use PostgreSQL.
#[derive(Debug, Clone, Default, Args)]
pub struct DbArgs {
    /// The admin URL: the run creates a fresh database through it and drops
    /// it at the end.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        default_value = herald_test::DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    pub database_url: String,
}

/// What the server runs with, as read on a benchmark connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// `SHOW synchronous_commit`.
    pub synchronous_commit: String,
    /// `SHOW fsync`.
    pub fsync: String,
}

impl Durability {
    /// Whether commits wait for the WAL to be flushed to disk.
    pub fn is_durable(&self) -> bool {
        self.fsync == "on" && self.synchronous_commit != "off"
    }

    /// `synchronous_commit=on fsync=on (durable)`.
    pub fn describe(&self) -> String {
        format!(
            "synchronous_commit={} fsync={} ({})",
            self.synchronous_commit,
            self.fsync,
            if self.is_durable() {
                "durable: every commit waits for its WAL flush"
            } else {
                "NOT durable: commits do not wait for the disk"
            }
        )
    }
}

/// A database that exists for one benchmark run: herald-test's fresh
/// database, dropped (connections and all) with this value, also when an
/// interrupted run drops it; and the parent's pool on it.
#[derive(Debug)]
pub struct BenchDatabase {
    // Dropped first: its connections go before the database does.
    pool: PgPool,
    database: TestDatabase,
}

impl BenchDatabase {
    /// Creates database `herald_bench_<run id>` through the admin URL of
    /// `args`, connects a small pool to it and, when `migrate`, applies
    /// herald's migrations.
    pub async fn create(
        args: &DbArgs,
        resources: &RunResources,
        migrate: bool,
    ) -> anyhow::Result<Self> {
        let name = format!("herald_bench_{}", resources.run_id());
        let server =
            Postgres::at(&args.database_url).context("parsing --database-url / DATABASE_URL")?;
        let database = server.create_database(&name).await.with_context(|| {
            format!("creating database {name} (is PostgreSQL up? scripts/services.sh up)")
        })?;
        let pool = pool(database.url(), 4).await?;
        if migrate {
            herald_postgres::migrate(&pool)
                .await
                .context("applying herald's migrations")?;
        }
        Ok(Self { pool, database })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        self.database.name()
    }

    /// A URL for this database (for child processes; it carries the password).
    pub fn url(&self) -> &str {
        self.database.url()
    }

    /// The parent's pool on this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Waits until no session but the benchmark's own is connected to this
    /// database (a driven service's backends have ended, and so flushed
    /// their statistics), failing after `timeout`.
    pub async fn wait_for_other_sessions_to_end(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let others: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name <> $1",
            )
            .bind(APPLICATION_NAME)
            .fetch_one(&self.pool)
            .await
            .context("reading pg_stat_activity")?;
            if others == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{others} sessions of other programs are still connected to {} after {timeout:?}",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs one statement (set-up between rounds: truncate, vacuum...).
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .with_context(|| format!("running {sql:?}"))?;
        Ok(())
    }

    /// What the server runs with, read on a connection of this database.
    async fn durability(&self) -> anyhow::Result<Durability> {
        let show = |setting: &'static str| async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {setting}"))
                .fetch_one(&self.pool)
                .await
                .with_context(|| format!("SHOW {setting}"))
        };
        Ok(Durability {
            synchronous_commit: show("synchronous_commit").await?,
            fsync: show("fsync").await?,
        })
    }

    /// Adds the database's name and what the server runs with to a
    /// report's `setup`; returns the report's note that says it.
    pub async fn describe(&self, setup: &mut Map<String, Value>) -> anyhow::Result<String> {
        let durability = self.durability().await?;
        let note = format!("PostgreSQL: {}", durability.describe());
        setup.insert("database".into(), self.name().into());
        let Durability {
            synchronous_commit,
            fsync,
        } = durability;
        setup.insert("synchronous_commit".into(), synchronous_commit.into());
        setup.insert("fsync".into(), fsync.into());
        Ok(note)
    }
}

/// The `application_name` of the benchmark's own sessions (its pools and
/// pgbench), which tells them from those of the processes it drives.
pub const APPLICATION_NAME: &str = "herald-bench";

/// A pool of at most `max` connections on `url`, with the server's own
/// (durable) settings.
pub async fn pool(url: &str, max: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("parsing the database URL")?
        .application_name(APPLICATION_NAME);
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(options)
        .await
        .context("connecting to the benchmark database")
}

/// The pool a child process opens on the benchmark database (its URL comes
/// in [`CHILD_DATABASE_URL`]).
pub async fn child_pool(max: u32) -> anyhow::Result<PgPool> {
    let url = std::env::var(CHILD_DATABASE_URL)
        .with_context(|| format!("{CHILD_DATABASE_URL} is not set"))?;
    pool(&url, max).await
}

/// The libpq environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
/// `PGDATABASE`) for `url`, so tools like `pgbench` connect without the
/// password on their command line.
pub fn libpq_env(url: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let url = url::Url::parse(url).context("parsing the database URL")?;
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let host = url.host().map(|host| match host {
        // libpq takes the address without its brackets.
        url::Host::Ipv6(address) => address.to_string(),
        host => decode(&host.to_string()),
    });
    let values = [
        ("PGHOST", host),
        ("PGPORT", url.port().map(|port| port.to_string())),
        ("PGUSER", Some(decode(url.username()))),
        ("PGPASSWORD", url.password().map(decode)),
        (
            "PGDATABASE",
            Some(decode(url.path().trim_start_matches('/'))),
        ),
    ];
    Ok(values
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.filter(|v| !v.is_empty())?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_url_into_the_libpq_environment() {
        let env = libpq_env("postgres://herald:p%40ss@127.0.0.1:5432/bench_1?sslmode=disable")
            .expect("env");
        assert_eq!(
            env,
            vec![
                ("PGHOST", "127.0.0.1".to_owned()),
                ("PGPORT", "5432".to_owned()),
                ("PGUSER", "herald".to_owned()),
                ("PGPASSWORD", "p@ss".to_owned()),
                ("PGDATABASE", "bench_1".to_owned()),
            ]
        );
        let env = libpq_env("postgres://localhost/db").expect("env");
        assert_eq!(
            env,
            vec![
                ("PGHOST", "localhost".to_owned()),
                ("PGDATABASE", "db".to_owned())
            ]
        );
    }

    #[test]
    fn durability_is_described() {
        let on = Durability {
            synchronous_commit: "on".into(),
            fsync: "on".into(),
        };
        assert!(on.is_durable());
        assert!(on
            .describe()
            .starts_with("synchronous_commit=on fsync=on (durable"));
        let off = Durability {
            synchronous_commit: "off".into(),
            fsync: "on".into(),
        };
        assert!(!off.is_durable());
    }
}
