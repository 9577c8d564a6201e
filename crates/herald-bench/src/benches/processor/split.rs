//! Where a processor's time per transaction goes: the child captures the
//! `transaction committed` debug event the processor writes after each
//! commit (its fields give the time split, in µs) and reports the mean,
//! p50 and p99 of every phase.
//!
//! Only that module's events are enabled (a target filter), so the
//! capture costs one JSON line per transaction, none per input.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::shared::child::SideResult;
use crate::shared::stats::{median, percentile};

/// Where the processor writes its per-transaction event.
const TARGET: &str = "herald_kafka::processor::runtime::transactions";

/// The event's message.
const MESSAGE: &str = "transaction committed";

/// The phases of a transaction, in order: (event field, name in reports,
/// what it covers).
pub const PHASES: [(&str, &str, &str); 5] = [
    (
        "begin_us",
        "begin",
        "begin_transaction (at least once: nothing)",
    ),
    (
        "process_us",
        "process",
        "from begin to the commit decision: polls, transform calls, outputs kept (exactly once) or queued (at least once)",
    ),
    (
        "offsets_us",
        "offsets",
        "send_offsets_to_transaction (AddOffsetsToTxn + TxnOffsetCommit)",
    ),
    (
        "deliveries_us",
        "deliveries",
        "awaiting every output's delivery report",
    ),
    (
        "commit_us",
        "commit",
        "commit_transaction (at least once: the consumer's synchronous offset commit)",
    ),
];

/// The captured events' JSON lines.
#[derive(Clone, Default)]
pub struct Capture {
    lines: Arc<Mutex<Vec<u8>>>,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Installs the capture as this process's subscriber (a child runs one
    /// side, so nothing else installs one). With `RUST_LOG` set, what it
    /// selects goes to stderr too (e.g. `RUST_LOG=librdkafka=debug` with
    /// `--set-producer debug=eos` shows the transactional protocol).
    pub fn install() -> anyhow::Result<Self> {
        let capture = Self::default();
        let writer = capture.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(move || writer.clone())
            .with_filter(Targets::new().with_target(TARGET, LevelFilter::DEBUG));
        let log = std::env::var_os("RUST_LOG").map(|_| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(EnvFilter::from_default_env())
        });
        tracing_subscriber::registry()
            .with(layer)
            .with(log)
            .try_init()?;
        Ok(capture)
    }

    /// Per phase, in µs, every committed transaction's value.
    fn phases(&self) -> Vec<Vec<f64>> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut phases = vec![Vec::new(); PHASES.len() + 1];
        for line in lines.split(|b| *b == b'\n') {
            let Ok(event) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let fields = &event["fields"];
            if fields["message"] != MESSAGE {
                continue;
            }
            let mut total = 0.0;
            for (i, (field, _, _)) in PHASES.iter().enumerate() {
                let us = fields[field].as_f64().unwrap_or(0.0);
                phases[i].push(us);
                total += us;
            }
            phases[PHASES.len()].push(total);
        }
        phases
    }

    /// `result` with the split's figures: `txn_count`, and per phase (and
    /// `total`) `txn_<phase>_{mean,p50,p99}_ms`.
    pub fn add_to(&self, mut result: SideResult) -> SideResult {
        let phases = self.phases();
        result = result.with("txn_count", phases[0].len() as f64);
        for (i, mut values) in phases.into_iter().enumerate() {
            let name = PHASES.get(i).map_or("total", |p| p.1);
            values.sort_by(f64::total_cmp);
            let mean = if values.is_empty() {
                0.0
            } else {
                values.iter().sum::<f64>() / values.len() as f64
            };
            let ms = |us: f64| us / 1000.0;
            result = result
                .with(&format!("txn_{name}_mean_ms"), ms(mean))
                .with(
                    &format!("txn_{name}_p50_ms"),
                    ms(percentile(&values, 50.0).unwrap_or(0.0)),
                )
                .with(
                    &format!("txn_{name}_p99_ms"),
                    ms(percentile(&values, 99.0).unwrap_or(0.0)),
                );
        }
        result
    }
}

/// One phase of one side, medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFigures {
    /// The phase (`begin` … `commit`, or `total`).
    pub phase: &'static str,
    /// Mean per transaction (ms).
    pub mean_ms: f64,
    /// Median per transaction (ms).
    pub p50_ms: f64,
    /// 99th percentile per transaction (ms).
    pub p99_ms: f64,
}

/// One side's split, medians over the rounds of each figure.
#[derive(Debug, Clone, Serialize)]
pub struct SideSplit {
    /// The side.
    pub side: String,
    /// Committed transactions (batches), median over the rounds.
    pub transactions: f64,
    /// Inputs per committed transaction, median over the rounds.
    pub inputs_per_transaction: f64,
    /// Every phase, then `total`.
    pub phases: Vec<PhaseFigures>,
}

/// The split of each side of `results` (side name → its rounds' results).
pub fn summarize<'a>(
    sides: impl IntoIterator<Item = (String, Vec<&'a SideResult>)>,
) -> Vec<SideSplit> {
    sides
        .into_iter()
        .map(|(side, results)| {
            let figure = |name: &str| {
                let values: Vec<f64> = results
                    .iter()
                    .filter_map(|r| r.extra.get(name).copied())
                    .collect();
                median(&values).unwrap_or(0.0)
            };
            let names = PHASES.iter().map(|p| p.1).chain(["total"]);
            SideSplit {
                transactions: figure("txn_count"),
                inputs_per_transaction: {
                    let per: Vec<f64> = results
                        .iter()
                        .map(|r| {
                            let commits = r.extra.get("commits").copied().unwrap_or(0.0);
                            let inputs = r.extra.get("committed_inputs").copied().unwrap_or(0.0);
                            inputs / commits.max(1.0)
                        })
                        .collect();
                    median(&per).unwrap_or(0.0)
                },
                phases: names
                    .map(|phase| PhaseFigures {
                        phase,
                        mean_ms: figure(&format!("txn_{phase}_mean_ms")),
                        p50_ms: figure(&format!("txn_{phase}_p50_ms")),
                        p99_ms: figure(&format!("txn_{phase}_p99_ms")),
                    })
                    .collect(),
                side,
            }
        })
        .collect()
}

/// The split as a table: one row per side, mean / p50 / p99 per phase.
pub fn table(splits: &[SideSplit]) -> String {
    let mut out = String::from(
        "time per transaction (ms: mean / p50 / p99 per committed transaction, medians over the rounds)\n",
    );
    let width = splits.iter().map(|s| s.side.len()).max().unwrap_or(4);
    out.push_str(&format!(
        "  {:<width$} {:>6} {:>7}",
        "side", "txns", "in/txn"
    ));
    for (_, name, _) in PHASES {
        out.push_str(&format!(" {name:>20}"));
    }
    out.push_str(&format!(" {:>20}\n", "total"));
    for split in splits {
        out.push_str(&format!(
            "  {:<width$} {:>6.0} {:>7.1}",
            split.side, split.transactions, split.inputs_per_transaction
        ));
        for p in &split.phases {
            out.push_str(&format!(
                " {:>20}",
                format!("{:.2}/{:.2}/{:.2}", p.mean_ms, p.p50_ms, p.p99_ms)
            ));
        }
        out.push('\n');
    }
    for (_, name, what) in PHASES {
        out.push_str(&format!("  {name}: {what}\n"));
    }
    out
}
