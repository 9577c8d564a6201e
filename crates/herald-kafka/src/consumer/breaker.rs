//! The circuit breaker: a dependency that is down is not a poison record.
//!
//! A transient failure is retried with backoff and, once the retry policy
//! gives up, dead-lettered: right for one record that keeps failing, wrong
//! when the database behind every handler is down, where a long enough
//! outage would dead-letter everything that arrives meanwhile. So the runtime
//! watches transient failures across keys. When enough of them come from
//! several keys within a window, with no success in between, the breaker
//! **opens**:
//!
//! - the consumer pauses its partitions (nothing more is fetched) and starts
//!   no queued record;
//! - a record that fails transiently while it is open stops counting
//!   attempts: it waits instead of being dead-lettered;
//! - one waiting record at a time is let through as a **probe**, at growing
//!   intervals (jittered, from [`CircuitBreaker::probe_initial`] up to
//!   [`CircuitBreaker::probe_max`]);
//! - the first handler success closes it: the waiting records retry at once
//!   with a fresh retry budget (their attempt numbers keep counting), and
//!   partitions resume.
//!
//! A burst of concurrent transient failures (many keys hitting one
//! deadlock storm at once) can open it too; it then closes at the first
//! probe that succeeds, having cost a pause rather than dead letters.
//!
//! Permanent failures and decode errors dead-letter as always, open or not.
//! A single key failing alone never opens it (its records are dead-lettered
//! by the retry policy, as a poison record should be).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use herald::RetryPolicy;
use tokio_util::sync::CancellationToken;

use super::ConsumerStats;

/// When a consumer stops consuming because its handlers' dependency is down
/// ([`crate::ConsumerConfig::circuit_breaker`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    /// Transient failures within [`CircuitBreaker::window`] that open the
    /// breaker (default 5)…
    pub failures: usize,
    /// …coming from at least this many distinct keys (default 2), so that
    /// one key failing alone stays a poison record.
    pub distinct_keys: usize,
    /// How far back failures count (default 10 s). Any handler success
    /// clears them.
    pub window: Duration,
    /// The first wait before a probe (default 500 ms).
    pub probe_initial: Duration,
    /// The longest wait between probes (default 30 s).
    pub probe_max: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: 5,
            distinct_keys: 2,
            window: Duration::from_secs(10),
            probe_initial: Duration::from_millis(500),
            probe_max: Duration::from_secs(30),
        }
    }
}

impl CircuitBreaker {
    /// The jittered pause before probe `n + 1` after `n` failed probes.
    fn probe_delay(&self, failed_probes: u32) -> Duration {
        RetryPolicy::forever(self.probe_initial, self.probe_max).pause(failed_probes)
    }
}

/// What a record that failed while the breaker is open may do next.
pub(crate) enum Turn {
    /// The breaker closed: retry, with a fresh retry budget.
    Closed,
    /// Retry now as the probe; report its failure through the guard.
    Probe(ProbeGuard),
    /// The consumer is stopping.
    Stopping,
}

#[derive(Debug, Default)]
struct State {
    /// Recent transient failures: when, and a hash of the key.
    failures: VecDeque<(Instant, u64)>,
    /// Whether a probe is running.
    probing: bool,
    /// Probes that failed since the breaker opened.
    failed_probes: u32,
    /// When the next probe may start.
    next_probe: Option<Instant>,
}

/// A consumer's breaker state, shared by its record tasks and its poll
/// thread.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: CircuitBreaker,
    open: AtomicBool,
    /// Whether `state.failures` may be non-empty: lets a success skip the
    /// lock in the common case.
    suspect: AtomicBool,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
    stats: Arc<ConsumerStats>,
    /// Records in [`Breaker::wait_turn`]: an open breaker needs one to
    /// probe with.
    waiting: std::sync::atomic::AtomicUsize,
}

impl Breaker {
    pub fn new(config: CircuitBreaker, stats: Arc<ConsumerStats>) -> Self {
        Self {
            config,
            open: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            stats,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the breaker is open (partitions should be paused).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// A handler succeeded: the dependency answers. Closes an open breaker.
    pub fn succeeded(&self) {
        if !self.suspect.load(Ordering::Acquire) && !self.is_open() {
            return;
        }
        self.close("circuit breaker closed: handlers succeed again; consuming resumes");
    }

    /// Forgets the failures and, if it was open, closes the breaker (logging
    /// `why`) and wakes the waiting records.
    fn close(&self, why: &'static str) {
        let mut state = self.state();
        state.failures.clear();
        self.suspect.store(false, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            state.probing = false;
            state.failed_probes = 0;
            state.next_probe = None;
            drop(state);
            self.stats.breaker_open.store(0, Ordering::Relaxed);
            tracing::info!("{why}");
            self.changed.notify_waiters();
        }
    }

    /// A handler failed transiently for the key hashed to `key`. Returns
    /// whether the breaker is open now.
    pub fn failed(&self, key: u64) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        self.suspect.store(true, Ordering::Release);
        state.failures.push_back((now, key));
        while state
            .failures
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.config.window)
        {
            state.failures.pop_front();
        }
        // Bounded: only the last `failures` entries decide.
        while state.failures.len() > self.config.failures.max(1) {
            state.failures.pop_front();
        }
        if self.is_open() {
            return true;
        }
        let mut keys: Vec<u64> = state.failures.iter().map(|(_, k)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        if state.failures.len() >= self.config.failures.max(1)
            && keys.len() >= self.config.distinct_keys.max(1)
        {
            self.open.store(true, Ordering::Release);
            state.failed_probes = 0;
            state.probing = false;
            state.next_probe = Some(now + self.config.probe_delay(1));
            drop(state);
            self.stats.breaker_open.store(1, Ordering::Relaxed);
            self.stats.breaker_trips.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                failures = self.config.failures,
                keys = keys.len(),
                window = ?self.config.window,
                "circuit breaker open: handlers fail transiently across keys; \
                 partitions paused, failing records wait instead of being dead-lettered"
            );
            return true;
        }
        false
    }

    /// Waits until the breaker closes or this record may probe; `stopping`
    /// (the consumer stops, or the record's partition is revoked) ends the
    /// wait.
    ///
    /// When the last waiting record leaves that way, the breaker closes:
    /// with no record left to probe with (their partitions went to another
    /// member, whose records do not reach this breaker) it would stay open
    /// for good, starting nothing. Closed, the next records run and are the
    /// probes: if the dependency is still down they open it again at once,
    /// long before their retry budget is spent.
    pub async fn wait_turn(self: &Arc<Self>, stopping: &CancellationToken) -> Turn {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let turn = self.wait(stopping).await;
        let left = self.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        if matches!(turn, Turn::Stopping) && left == 0 && self.is_open() {
            self.close(
                "circuit breaker closed: no record is left waiting to probe; the next ones will",
            );
        }
        turn
    }

    async fn wait(self: &Arc<Self>, stopping: &CancellationToken) -> Turn {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_open() {
                return Turn::Closed;
            }
            let wait = {
                let mut state = self.state();
                let now = Instant::now();
                let due = state.next_probe.unwrap_or(now);
                if !state.probing && due <= now {
                    state.probing = true;
                    return Turn::Probe(ProbeGuard {
                        breaker: Arc::clone(self),
                        failed: false,
                    });
                }
                // While a probe runs, wake on its outcome (or after a while).
                if state.probing {
                    self.config.probe_max
                } else {
                    due - now
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                () = stopping.cancelled() => return Turn::Stopping,
            }
        }
    }
}

/// The right to probe; released on drop.
pub(crate) struct ProbeGuard {
    breaker: Arc<Breaker>,
    failed: bool,
}

impl ProbeGuard {
    /// The probe failed transiently: the next one waits longer.
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        let breaker = &self.breaker;
        let mut state = breaker.state();
        state.probing = false;
        if self.failed {
            state.failed_probes = state.failed_probes.saturating_add(1);
            let delay = breaker.config.probe_delay(state.failed_probes + 1);
            state.next_probe = Some(Instant::now() + delay);
            tracing::info!(?delay, "circuit breaker probe failed; still open");
        }
        drop(state);
        breaker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        let config = CircuitBreaker {
            failures: 3,
            distinct_keys: 2,
            window: Duration::from_secs(60),
            probe_initial: Duration::from_millis(1),
            probe_max: Duration::from_millis(5),
        };
        Arc::new(Breaker::new(config, Arc::default()))
    }

    #[test]
    fn one_key_failing_alone_never_opens_it() {
        let b = breaker();
        for _ in 0..10 {
            assert!(!b.failed(7));
        }
        assert!(!b.is_open());
    }

    #[test]
    fn failures_across_keys_open_it_and_a_success_closes_it() {
        let b = breaker();
        assert!(!b.failed(1));
        assert!(!b.failed(2));
        assert!(b.failed(1), "three failures from two keys");
        assert_eq!(b.stats.breaker_open.load(Ordering::Relaxed), 1);
        b.succeeded();
        assert!(!b.is_open());
        assert_eq!(b.stats.breaker_open.load(Ordering::Relaxed), 0);
        assert!(!b.failed(3), "the success cleared the earlier failures");
    }

    #[test]
    fn a_success_between_failures_keeps_it_closed() {
        let b = breaker();
        b.failed(1);
        b.failed(2);
        b.succeeded();
        assert!(!b.failed(3));
        assert!(!b.is_open());
    }

    #[tokio::test]
    async fn one_probe_at_a_time_and_waiters_resume_on_close() {
        let b = breaker();
        for key in [1, 2, 3] {
            b.failed(key);
        }
        let stop = CancellationToken::new();
        let Turn::Probe(probe) = b.wait_turn(&stop).await else {
            panic!("the first waiter probes");
        };
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            let stop = stop.clone();
            async move { matches!(b.wait_turn(&stop).await, Turn::Closed) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a second probe waits for the first");
        b.succeeded();
        drop(probe);
        assert!(waiter.await.expect("waiter"), "the close wakes the waiter");
    }

    #[tokio::test]
    async fn the_last_waiter_leaving_closes_it() {
        let b = breaker();
        for key in [1, 2, 3] {
            b.failed(key);
        }
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(matches!(b.wait_turn(&stop).await, Turn::Stopping));
        assert!(!b.is_open(), "nothing left to probe with: closed");
        assert_eq!(b.stats.breaker_open.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_failed_probe_lets_the_next_one_through_later() {
        let b = breaker();
        for key in [1, 2, 3] {
            b.failed(key);
        }
        let stop = CancellationToken::new();
        let Turn::Probe(probe) = b.wait_turn(&stop).await else {
            panic!("probe");
        };
        probe.failed();
        assert!(matches!(b.wait_turn(&stop).await, Turn::Probe(_)));
        stop.cancel();
    }
}
