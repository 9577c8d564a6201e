//! Each measured side runs in its own child process: the same binary,
//! re-executed with the hidden `__side` subcommand and a JSON spec. The child
//! does its work, reads its peak resident memory (`VmHWM`) and prints one
//! JSON line, a [`SideResult`], as the last line of its stdout.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::stats::rate;

/// The subcommand a child runs (hidden from `--help`).
pub const SIDE_SUBCOMMAND: &str = "__side";

/// What one side measured, as its child reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideResult {
    /// Records the side processed.
    pub records: u64,
    /// Seconds the measured work took.
    pub seconds: f64,
    /// Peak resident memory of the child, from `VmHWM` (KiB).
    pub peak_rss_kib: u64,
    /// Figures specific to a benchmark (e.g. the consumer runtime's counters).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
}

impl SideResult {
    /// A result for `records` done in `seconds`, stamped with this
    /// process's peak RSS now (call it at the end of the side).
    pub fn finish(records: u64, seconds: f64) -> anyhow::Result<Self> {
        Ok(Self {
            records,
            seconds,
            peak_rss_kib: peak_rss_kib()?,
            extra: BTreeMap::new(),
        })
    }

    /// Adds a benchmark-specific figure.
    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.extra.insert(name.to_owned(), value);
        self
    }

    /// Records per second.
    pub fn rate(&self) -> f64 {
        rate(self.records, self.seconds)
    }
}

/// This process's peak resident set size in KiB (`VmHWM` in /proc/self/status).
pub fn peak_rss_kib() -> anyhow::Result<u64> {
    vm_hwm("/proc/self/status")
}

/// Peak resident memory (`VmHWM`, KiB) of another process of ours, e.g. a
/// service the benchmark started.
pub fn peak_rss_kib_of(pid: u32) -> anyhow::Result<u64> {
    vm_hwm(&format!("/proc/{pid}/status"))
}

fn vm_hwm(path: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_vm_hwm(&status).with_context(|| format!("no VmHWM line in {path}"))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs one side in a child process, with extra environment variables `env`
/// (e.g. the benchmark database's URL, kept off the command line), and
/// returns what it reported. The child's stderr goes to ours, so its errors
/// and progress are visible; a child still running after `timeout_secs`
/// exits with an error.
pub async fn run_side<S: Serialize>(
    spec: &S,
    timeout_secs: u64,
    env: &[(&str, &str)],
) -> anyhow::Result<SideResult> {
    spawn_side(spec, timeout_secs, env)?.finish().await
}

/// A side running in a child process whose stdin is a pipe: closing it
/// ([`RunningSide::finish`]) tells a side that waits for [`stdin_closed`] to
/// stop. Dropping it closes the pipe too, so an interrupted run never leaves
/// such a child behind.
#[derive(Debug)]
pub struct RunningSide {
    child: std::process::Child,
    spec: String,
}

/// Starts one side in a child process without waiting for it.
pub fn spawn_side<S: Serialize>(
    spec: &S,
    timeout_secs: u64,
    env: &[(&str, &str)],
) -> anyhow::Result<RunningSide> {
    let spec = serde_json::to_string(spec).context("encoding the side spec")?;
    let exe = std::env::current_exe().context("locating the herald-bench binary")?;
    let mut command = Command::new(&exe);
    command
        .arg(SIDE_SUBCOMMAND)
        .arg(&spec)
        .arg(timeout_secs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(RunningSide { child, spec })
}

impl RunningSide {
    /// Closes the child's stdin, waits for it to exit and returns what it
    /// reported.
    pub async fn finish(mut self) -> anyhow::Result<SideResult> {
        drop(self.child.stdin.take());
        let RunningSide { child, spec } = self;
        tokio::task::spawn_blocking(move || {
            let output = child
                .wait_with_output()
                .context("waiting for a side's process")?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                bail!("side {spec} failed ({}); stdout: {stdout}", output.status);
            }
            let last = stdout
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .with_context(|| format!("side {spec} printed no result"))?;
            serde_json::from_str(last).with_context(|| format!("side {spec} printed {last:?}"))
        })
        .await
        .context("waiting for a side")?
    }
}

/// In a child: completes when the parent closes our stdin (or it is not a
/// pipe at all and reads end at once).
pub async fn stdin_closed() {
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buffer = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buffer) {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The child's start: a watchdog that ends this process with an error if
/// the side is still running after `timeout_secs`.
pub fn watchdog(timeout_secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(timeout_secs));
        eprintln!("herald-bench: side still running after {timeout_secs} s; giving up");
        std::process::exit(3);
    });
}

/// The child's end: prints `result` as the one JSON line the parent reads.
pub fn report(result: &SideResult) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(result)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_hwm() {
        let status =
            "Name:\therald-bench\nVmPeak:\t  200000 kB\nVmHWM:\t   97280 kB\nVmRSS:\t 90000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(97280));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn own_peak_rss_is_readable() {
        assert!(peak_rss_kib().expect("VmHWM") > 0);
    }

    #[test]
    fn result_round_trips_as_one_line() {
        let result = SideResult::finish(10, 2.0)
            .expect("rss")
            .with("consumed", 10.0);
        let line = serde_json::to_string(&result).expect("json");
        assert!(!line.contains('\n'));
        let back: SideResult = serde_json::from_str(&line).expect("parse");
        assert_eq!(back.records, 10);
        assert_eq!(back.rate(), 5.0);
        assert_eq!(back.extra["consumed"], 10.0);
    }
}
