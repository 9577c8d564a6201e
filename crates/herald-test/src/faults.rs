//! A seeded fault schedule and the timeline of a fault run, for your own
//! fault tests: every random choice (which process to kill, when, for how
//! long) comes from one seed, every fault injected is a named step on the
//! timeline, and a failing run prints both, so that
//! `HERALD_FAULT_SEED=<seed>` replays the same schedule.
//!
//! ```no_run
//! use std::time::Duration;
//! use herald_test::faults::Schedule;
//! use herald_test::private::PrivateKafka;
//!
//! let mut schedule = Schedule::from_env();
//! let mut kafka = PrivateKafka::start();
//! // … start your consumers against kafka.brokers(), produce a load …
//! for _ in 0..3 {
//!     let pause = schedule.between(Duration::from_millis(300), Duration::from_secs(2));
//!     std::thread::sleep(pause);
//!     schedule.step("broker SIGKILL", "");
//!     kafka.kill();
//!     schedule.step("broker restart", "");
//!     kafka.restart();
//! }
//! // … then judge the run, with the schedule in every failure message:
//! let report = schedule.report();
//! assert!(true, "{report}");
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The environment variable that replays a schedule.
pub const SEED_VARIABLE: &str = "HERALD_FAULT_SEED";

/// What happened when in a fault run, one line per step, with the time
/// since the run began. Clones share the same lines (a chaos thread and
/// the test note into one timeline).
#[derive(Clone, Debug)]
pub struct Timeline {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// An empty timeline starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    /// Adds a line (also written to stderr, where a test's output shows
    /// it as it happens).
    pub fn note(&self, what: impl Into<String>) {
        let line = format!(
            "{:>7.2}s {}",
            self.start.elapsed().as_secs_f64(),
            what.into()
        );
        eprintln!("{line}");
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(line);
    }

    /// Every line so far, one per line.
    pub fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .join("\n")
    }
}

/// A fault schedule: a seeded random source for every choice of a fault
/// run, and the timeline of the steps taken.
#[derive(Debug)]
pub struct Schedule {
    seed: u64,
    rng: StdRng,
    timeline: Timeline,
}

impl Schedule {
    /// The schedule of `HERALD_FAULT_SEED` when it is set (a replay), else
    /// of a fresh random seed; the seed is printed either way.
    pub fn from_env() -> Self {
        let seed = std::env::var(SEED_VARIABLE)
            .ok()
            .and_then(|seed| seed.trim().parse().ok())
            .unwrap_or_else(|| rand::thread_rng().r#gen());
        Self::seeded(seed)
    }

    /// The schedule of `seed`.
    pub fn seeded(seed: u64) -> Self {
        eprintln!("fault schedule seed {seed} (replay: {SEED_VARIABLE}={seed})");
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            timeline: Timeline::new(),
        }
    }

    /// The seed that replays this schedule.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The random source every choice of the run draws from.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// A duration drawn uniformly from `low..high`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        self.rng.gen_range(low..high)
    }

    /// One of `0..n`, drawn uniformly (`n` > 0).
    pub fn pick(&mut self, n: usize) -> usize {
        self.rng.gen_range(0..n)
    }

    /// Records a fault step: its `name` (e.g. "broker SIGKILL") and what
    /// it hit.
    pub fn step(&self, name: &str, detail: &str) {
        if detail.is_empty() {
            self.timeline.note(format!("[{name}]"));
        } else {
            self.timeline.note(format!("[{name}] {detail}"));
        }
    }

    /// The timeline, to note what is not a fault (load progress, checks)
    /// or to hand to another thread.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The seed and the timeline so far, for a failure message.
    pub fn report(&self) -> String {
        format!(
            "fault schedule seed {} (replay: {SEED_VARIABLE}={})\n{}",
            self.seed,
            self.seed,
            self.timeline.text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_choices_and_the_report_names_it() {
        let draw = |seed| {
            let mut schedule = Schedule::seeded(seed);
            let picks: Vec<usize> = (0..8).map(|_| schedule.pick(10)).collect();
            let pause = schedule.between(Duration::from_millis(1), Duration::from_secs(1));
            (picks, pause)
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let schedule = Schedule::seeded(7);
        schedule.step("broker SIGKILL", "node 1");
        let report = schedule.report();
        assert!(report.contains("HERALD_FAULT_SEED=7"), "{report}");
        assert!(report.contains("[broker SIGKILL] node 1"), "{report}");
    }
}
