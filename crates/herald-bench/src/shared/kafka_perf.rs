//! The ceiling: Apache Kafka's own producer perf test
//! (`org.apache.kafka.tools.ProducerPerformance`) on the same broker, run
//! from the jars `scripts/services.sh up` put in `.cache/kafka/libs-<version>/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};

/// Where the Kafka tools are.
#[derive(Debug, Clone)]
pub struct KafkaTools {
    libs: PathBuf,
}

impl KafkaTools {
    /// The tools in `libs` (a `libs-<version>` directory of jars), or the
    /// repository's newest `.cache/kafka/libs-*` when `None`.
    pub fn locate(libs: Option<PathBuf>) -> anyhow::Result<Self> {
        let libs = libs.or_else(herald_test::private::kafka_libs).context(
            "no Kafka jars in .cache/kafka (run scripts/services.sh up, or pass --kafka-libs)",
        )?;
        if !libs.is_dir() {
            bail!("--kafka-libs {} is not a directory", libs.display());
        }
        Ok(Self { libs })
    }

    /// The jar directory in use.
    pub fn libs(&self) -> &Path {
        &self.libs
    }

    /// Runs ProducerPerformance: `records` records of `record_size` bytes to
    /// `topic`, unthrottled, with herald's acks/idempotence/compression/linger.
    /// Returns the records per second of its summary line.
    pub fn producer_perf(
        &self,
        brokers: &str,
        topic: &str,
        records: u64,
        record_size: usize,
    ) -> anyhow::Result<f64> {
        let output = herald_test::private::kafka_java(&self.libs, &[])
            .arg("org.apache.kafka.tools.ProducerPerformance")
            .args(["--topic", topic])
            .args(["--num-records", &records.to_string()])
            .args(["--record-size", &record_size.to_string()])
            .args(["--throughput", "-1"])
            .arg("--producer-props")
            .arg(format!("bootstrap.servers={brokers}"))
            .args([
                "acks=all",
                "enable.idempotence=true",
                "compression.type=lz4",
                "linger.ms=5",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("starting java (is Java 17 installed?)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("ProducerPerformance failed ({}): {stdout}", output.status);
        }
        stdout
            .lines()
            .rev()
            .find_map(records_per_sec)
            .with_context(|| format!("no summary line in ProducerPerformance's output: {stdout}"))
    }
}

/// The records per second of the final line, e.g. `1000000 records sent,
/// 123456.7 records/sec (30.14 MB/sec), 512.30 ms avg latency, 1234.00 ms
/// max latency, 500 ms 50th, ...` (the periodic lines have no percentiles
/// and are skipped).
fn records_per_sec(line: &str) -> Option<f64> {
    if !line.contains("records sent") || !line.contains("50th") {
        return None;
    }
    let end = line.find(" records/sec")?;
    line[..end]
        .trim_end()
        .rsplit([' ', ','])
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_final_summary() {
        let line = "1000000 records sent, 523456.7 records/sec (127.80 MB/sec), 212.35 ms avg latency, 640.00 ms max latency, 201 ms 50th, 480 ms 95th, 590 ms 99th, 630 ms 99.9th.";
        assert_eq!(records_per_sec(line), Some(523_456.7));
    }

    #[test]
    fn skips_periodic_lines() {
        let line = "2441 records sent, 488.1 records/sec (0.12 MB/sec), 1.5 ms avg latency, 24.0 ms max latency.";
        assert_eq!(records_per_sec(line), None);
    }
}
