//! The harness every benchmark shares: the common flags, timing, ratios and
//! medians, peak RSS, the child processes each side runs in, the rounds of
//! sides and their reports, the benchmark topics and databases, the record
//! workload, the consumer runtime run to the end of a topic, the latency
//! benchmarks' open loop, the Kafka tools' perf test, and the binaries built
//! beside the sides (the service, the peers).

pub mod arrivals;
pub mod build;
pub mod child;
pub mod consume;
pub mod cpu;
pub mod database;
pub mod kafka_perf;
pub mod report;
pub mod stats;
pub mod topics;
pub mod workload;

use clap::Args;

/// Flags every benchmark takes (but `relay-latency` and `orders`). Child
/// processes get them in their side's spec.
#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
pub struct CommonArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = herald_test::DEFAULT_KAFKA_BROKERS)]
    pub brokers: String,
    /// Records per measured side.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Bytes of each record's payload (the JSON body of the event).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Partitions of every benchmark topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Rounds; each round runs every side once, the order alternating from
    /// round to round so drift on a noisy machine favors neither side.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Distinct record keys (aggregate ids), cycled through in order.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Give up on a side that has not finished after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub side_timeout_secs: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    /// Rejects values no benchmark can run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.records > 0, "--records must be at least 1");
        anyhow::ensure!(self.partitions > 0, "--partitions must be at least 1");
        anyhow::ensure!(self.rounds > 0, "--rounds must be at least 1");
        anyhow::ensure!(self.keys > 0, "--keys must be at least 1");
        self.workload()?;
        Ok(())
    }

    /// The run's records.
    pub fn workload(&self) -> anyhow::Result<workload::Workload> {
        workload::Workload::new(self.payload_bytes, self.keys, self.records)
    }

    /// The report's setup entries these flags make; a benchmark adds its own.
    pub fn setup(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut setup = serde_json::Map::new();
        setup.insert("records".into(), self.records.into());
        setup.insert("payload_bytes".into(), self.payload_bytes.into());
        setup.insert("partitions".into(), self.partitions.into());
        setup.insert("keys".into(), self.keys.into());
        setup.insert("brokers".into(), self.brokers.clone().into());
        setup
    }
}

/// Prints a progress line on stderr (stdout carries only the report).
pub fn progress(line: impl std::fmt::Display) {
    eprintln!("herald-bench: {line}");
}
