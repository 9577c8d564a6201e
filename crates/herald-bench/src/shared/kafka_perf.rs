//! The ceiling: Apache Kafka's own producer perf test
//! (`org.apache.kafka.tools.ProducerPerformance`) on the same broker, run
//! from the jars `scripts/services.sh up` put in `.cache/kafka/libs-<version>/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::Serialize;

/// Where the Kafka tools are.
#[derive(Debug, Clone)]
pub struct KafkaTools {
    libs: PathBuf,
    log4j: Option<PathBuf>,
}

/// The final summary line of a ProducerPerformance run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerfSummary {
    /// Records sent.
    pub records: u64,
    /// Records per second.
    pub records_per_sec: f64,
    /// MB per second.
    pub mb_per_sec: f64,
    /// Mean latency (ms).
    pub avg_latency_ms: f64,
    /// Max latency (ms).
    pub max_latency_ms: f64,
}

/// The repository root: the first ancestor of the current directory, then
/// of this crate's source directory, that has `scripts/services.sh`.
fn repo_root() -> Option<PathBuf> {
    let from_cwd = std::env::current_dir().ok();
    let from_source = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    [from_cwd, from_source]
        .into_iter()
        .flatten()
        .find_map(|dir| {
            dir.ancestors()
                .find(|d| d.join("scripts/services.sh").is_file())
                .map(Path::to_path_buf)
        })
}

impl KafkaTools {
    /// The tools in `libs` (a `libs-<version>` directory of jars), or the
    /// newest `.cache/kafka/libs-*` of the repository when `None`.
    pub fn locate(libs: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = repo_root();
        let libs = match libs {
            Some(libs) => libs,
            None => {
                let cache = root
                    .as_ref()
                    .map(|r| r.join(".cache/kafka"))
                    .context("cannot find the repository root; pass --kafka-libs")?;
                let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
                    .with_context(|| {
                        format!(
                            "reading {} (run scripts/services.sh up, or pass --kafka-libs)",
                            cache.display()
                        )
                    })?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_dir()
                            && p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with("libs-"))
                    })
                    .collect();
                found.sort();
                found.pop().with_context(|| {
                    format!("no libs-<version> directory in {}", cache.display())
                })?
            }
        };
        if !libs.is_dir() {
            bail!("--kafka-libs {} is not a directory", libs.display());
        }
        let log4j = root
            .map(|r| r.join("scripts/kafka/tools-log4j2.properties"))
            .filter(|p| p.is_file());
        Ok(Self { libs, log4j })
    }

    /// The jar directory in use.
    pub fn libs(&self) -> &Path {
        &self.libs
    }

    /// Runs ProducerPerformance: `records` records of `record_size` bytes to
    /// `topic`, unthrottled, with herald's acks/idempotence/compression/linger.
    pub fn producer_perf(
        &self,
        brokers: &str,
        topic: &str,
        records: u64,
        record_size: usize,
    ) -> anyhow::Result<PerfSummary> {
        let mut command = Command::new("java");
        if let Some(log4j) = &self.log4j {
            command.arg(format!("-Dlog4j2.configurationFile={}", log4j.display()));
        }
        command
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
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
            .stderr(Stdio::inherit());
        let output = command
            .output()
            .context("starting java (is Java 17 installed?)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("ProducerPerformance failed ({}): {stdout}", output.status);
        }
        stdout
            .lines()
            .rev()
            .find_map(parse_summary)
            .with_context(|| format!("no summary line in ProducerPerformance's output: {stdout}"))
    }
}

/// Parses the final line, e.g. `1000000 records sent, 123456.7 records/sec
/// (30.14 MB/sec), 512.30 ms avg latency, 1234.00 ms max latency, 500 ms
/// 50th, ...` (the periodic lines have no percentiles and are skipped).
pub fn parse_summary(line: &str) -> Option<PerfSummary> {
    if !line.contains("records sent") || !line.contains("50th") {
        return None;
    }
    let number_before = |marker: &str| -> Option<f64> {
        let end = line.find(marker)?;
        line[..end]
            .trim_end()
            .rsplit([' ', '(', ','])
            .next()?
            .parse()
            .ok()
    };
    Some(PerfSummary {
        records: number_before(" records sent")? as u64,
        records_per_sec: number_before(" records/sec")?,
        mb_per_sec: number_before(" MB/sec")?,
        avg_latency_ms: number_before(" ms avg latency")?,
        max_latency_ms: number_before(" ms max latency")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_final_summary() {
        let line = "1000000 records sent, 523456.7 records/sec (127.80 MB/sec), 212.35 ms avg latency, 640.00 ms max latency, 201 ms 50th, 480 ms 95th, 590 ms 99th, 630 ms 99.9th.";
        assert_eq!(
            parse_summary(line),
            Some(PerfSummary {
                records: 1_000_000,
                records_per_sec: 523_456.7,
                mb_per_sec: 127.80,
                avg_latency_ms: 212.35,
                max_latency_ms: 640.0,
            })
        );
    }

    #[test]
    fn skips_periodic_lines() {
        let line = "2441 records sent, 488.1 records/sec (0.12 MB/sec), 1.5 ms avg latency, 24.0 ms max latency.";
        assert_eq!(parse_summary(line), None);
    }
}
