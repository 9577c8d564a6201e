//! Exponential backoff with full jitter, bounded by an attempt count and a
//! total deadline.

use std::time::Duration;

use rand::Rng;

/// When and how often a transient failure is retried.
///
/// Delay before retry `n` (1-based) is a random duration in
/// `[0, min(max_delay, initial_delay * multiplier^(n-1))]` ("full jitter"), so
/// many consumers failing together do not retry in lockstep.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first one; `1` means never retry.
    pub max_attempts: u32,
    /// Upper bound of the first delay.
    pub initial_delay: Duration,
    /// Cap on any single delay.
    pub max_delay: Duration,
    /// Growth factor of the delay bound per attempt.
    pub multiplier: f64,
    /// Give up once this much time has passed since the first failure, even
    /// with attempts left.
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            multiplier: 2.0,
            deadline: Some(Duration::from_secs(60)),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// A policy that never gives up: from `initial`, doubling, up to `max`,
    /// jittered. For loops that wait out an outage (a relay's passes, a
    /// supervisor's restarts, a circuit breaker's probes).
    pub fn forever(initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts: u32::MAX,
            initial_delay: initial,
            max_delay: max,
            multiplier: 2.0,
            deadline: None,
        }
    }

    /// The jittered pause after `failures` failures in a row (at least 1),
    /// for a policy that keeps trying ([`RetryPolicy::forever`]): the
    /// longest delay once the policy would give up.
    pub fn pause(&self, failures: u32) -> Duration {
        self.next_delay(failures.max(1), Duration::ZERO)
            .unwrap_or(self.max_delay)
    }

    /// The upper bound of the delay before attempt `attempt + 1`, after
    /// `attempt` failed attempts (`attempt >= 1`).
    pub fn delay_bound(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let bound = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        Duration::from_secs_f64(bound.min(self.max_delay.as_secs_f64()))
    }

    /// The delay to wait after `attempt` failed attempts, or `None` when the
    /// policy says to give up (attempts exhausted, or the deadline since the
    /// first failure `elapsed` would pass).
    pub fn next_delay(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let bound = self.delay_bound(attempt);
        let delay = if bound.is_zero() {
            bound
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=bound)
        };
        match self.deadline {
            Some(deadline) if elapsed + delay > deadline => None,
            _ => Some(delay),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forever_never_gives_up_and_stays_under_its_cap() {
        let policy = RetryPolicy::forever(Duration::from_millis(10), Duration::from_millis(80));
        for failures in [0, 1, 5, 1_000, u32::MAX] {
            let pause = policy.pause(failures);
            assert!(pause <= Duration::from_millis(80), "{failures}: {pause:?}");
        }
        // No deadline, and no attempt limit short of u32::MAX.
        assert!(policy
            .next_delay(1_000_000, Duration::from_secs(86_400))
            .is_some());
    }

    #[test]
    fn bounds_grow_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            multiplier: 2.0,
            deadline: None,
        };
        let bounds: Vec<u128> = (1..=6).map(|a| policy.delay_bound(a).as_millis()).collect();
        assert_eq!(bounds, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn delays_are_jittered_within_the_bound() {
        let policy = RetryPolicy::default();
        let delays: Vec<Duration> = (0..200)
            .map(|_| policy.next_delay(3, Duration::ZERO).expect("attempts left"))
            .collect();
        assert!(delays.iter().all(|d| *d <= policy.delay_bound(3)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 50, "jitter should spread delays");
    }

    #[test]
    fn gives_up_after_max_attempts_or_deadline() {
        let policy = RetryPolicy {
            max_attempts: 3,
            deadline: Some(Duration::from_secs(1)),
            ..RetryPolicy::default()
        };
        assert!(policy.next_delay(2, Duration::ZERO).is_some());
        assert!(policy.next_delay(3, Duration::ZERO).is_none());
        assert!(policy.next_delay(1, Duration::from_secs(2)).is_none());
        assert!(RetryPolicy::never().next_delay(1, Duration::ZERO).is_none());
    }
}
