//! CPU time of the processes a benchmark drives, read from `/proc`: the
//! service by pid, PostgreSQL and the Kafka broker by command name (every
//! `postgres` process, backends included; every `java` process, which on a
//! herald test machine is the broker).
//!
//! Times are `utime + stime + cutime + cstime` (the last two: children that
//! exited and were reaped, so a PostgreSQL backend that ended during the run
//! still counts, through the postmaster), in `/proc`'s clock ticks, which
//! Linux fixes at 100 per second for user space (`USER_HZ`).

use std::collections::BTreeMap;

/// `/proc`'s clock ticks per second (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU milliseconds used so far, per group of processes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuSnapshot {
    /// Group name → CPU ms.
    pub ms: BTreeMap<&'static str, f64>,
}

impl CpuSnapshot {
    /// The CPU used now by `pid` (as `service`), and by every process named
    /// `postgres` and `java` (as `postgres` and `broker`).
    pub fn take(service: u32) -> Self {
        let mut ms = BTreeMap::from([("service", 0.0), ("postgres", 0.0), ("broker", 0.0)]);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self { ms };
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((comm, ticks)) = parse_stat(&stat) else {
                continue;
            };
            let group = match comm {
                _ if pid == service => "service",
                "postgres" => "postgres",
                "java" => "broker",
                _ => continue,
            };
            *ms.entry(group).or_default() += ticks as f64 * 1000.0 / TICKS_PER_SECOND;
        }
        Self { ms }
    }

    /// CPU ms per unit of work between `earlier` and this snapshot, per
    /// group.
    pub fn per(&self, earlier: &Self, units: u64) -> BTreeMap<&'static str, f64> {
        self.ms
            .iter()
            .map(|(group, now)| {
                let before = earlier.ms.get(group).copied().unwrap_or(0.0);
                (*group, (now - before).max(0.0) / units.max(1) as f64)
            })
            .collect()
    }
}

/// The command name and `utime + stime + cutime + cstime` of a
/// `/proc/<pid>/stat` line. The name is in parentheses and may hold spaces
/// and parentheses itself, so the fields are counted from its last `)`.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After ")": state (field 3) … utime is field 14, so index 11.
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((comm, ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stat_line() {
        let line = "4242 (postgres: herald x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1200 300 40 2 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("postgres: herald x", 1542)));
        assert_eq!(parse_stat("4242 (java) S 1"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = std::process::id();
        let before = CpuSnapshot::take(me);
        // Work until a tick shows (ticks are 10 ms), bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut n = 0u64;
        let used = loop {
            for i in 0..1_000_000u64 {
                n = n.wrapping_mul(31).wrapping_add(i);
            }
            let used = CpuSnapshot::take(me).per(&before, 1)["service"];
            if used > 0.0 || std::time::Instant::now() > deadline {
                break used;
            }
        };
        std::hint::black_box(n);
        assert!(
            used > 0.0,
            "no CPU time seen for this process in 10 s of work"
        );
    }
}
