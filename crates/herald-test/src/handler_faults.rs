//! Faults injected into your own handler: a panic, a hang, a transient or a
//! permanent failure, each for one key and a given number of calls, so a
//! fault test can put the consumer runtime's answers (retries with backoff,
//! the handler timeout, dead letters, per-key parking) through your real
//! handler and effects.
//!
//! Call [`HandlerFaults::inject`] where your handler would fail: at its
//! start, or inside its database transaction, after its first write, to
//! prove that a cut-off call leaves nothing behind.
//!
//! ```no_run
//! # async fn handler(key: &str) -> Result<(), herald::HandlerError> {
//! use std::time::Duration;
//! use herald_test::handler_faults::HandlerFaults;
//!
//! let faults = HandlerFaults::new()
//!     .hang("key-3", Duration::from_secs(3600), 1) // past the handler timeout, once
//!     .fail_transiently("key-9", 2) // retried with backoff, then applied
//!     .panic("key-13", 1); // dead-lettered; its key is parked behind it
//! // In the handler, per record:
//! faults.inject(key).await?;
//! // … the handler's real work …
//! # Ok(()) }
//! ```
//!
//! Each rule fires for its first `times` calls of its key, then never
//! again; [`HandlerFaults::fired`] lists what fired, for the test's
//! judgement, and [`HandlerFaults::on_timeline`] notes each firing on a
//! fault run's [`Timeline`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald::HandlerError;

use crate::faults::Timeline;

/// What a rule does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The handler panics.
    Panic,
    /// The handler waits this long before it goes on (a dependency that
    /// hangs; a runtime with a handler timeout cuts it off first).
    Hang(Duration),
    /// The handler fails with [`HandlerError::transient`].
    Transient,
    /// The handler fails with [`HandlerError::permanent`].
    Permanent,
}

impl Fault {
    /// A short name, for the timeline and [`HandlerFaults::fired`].
    pub fn name(self) -> &'static str {
        match self {
            Fault::Panic => "panic",
            Fault::Hang(_) => "hang",
            Fault::Transient => "transient failure",
            Fault::Permanent => "permanent failure",
        }
    }
}

#[derive(Debug)]
struct Rule {
    key: String,
    fault: Fault,
    remaining: u32,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    fired: Vec<(String, Fault)>,
}

/// Rules of faults per key, shared by every clone (hand one clone to the
/// handler, keep one for the judgement).
#[derive(Debug, Clone, Default)]
pub struct HandlerFaults {
    state: Arc<Mutex<State>>,
    timeline: Option<Timeline>,
}

impl HandlerFaults {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule: the first `times` calls for `key` meet `fault`. Rules
    /// of one key fire in the order they were added.
    pub fn rule(self, key: impl Into<String>, fault: Fault, times: u32) -> Self {
        self.lock().rules.push(Rule {
            key: key.into(),
            fault,
            remaining: times,
        });
        self
    }

    /// The first `times` calls for `key` panic.
    pub fn panic(self, key: impl Into<String>, times: u32) -> Self {
        self.rule(key, Fault::Panic, times)
    }

    /// The first `times` calls for `key` wait `length` first.
    pub fn hang(self, key: impl Into<String>, length: Duration, times: u32) -> Self {
        self.rule(key, Fault::Hang(length), times)
    }

    /// The first `times` calls for `key` fail transiently.
    pub fn fail_transiently(self, key: impl Into<String>, times: u32) -> Self {
        self.rule(key, Fault::Transient, times)
    }

    /// The first `times` calls for `key` fail permanently.
    pub fn fail_permanently(self, key: impl Into<String>, times: u32) -> Self {
        self.rule(key, Fault::Permanent, times)
    }

    /// Notes every firing on `timeline` (a fault run's, so a failure
    /// message shows when each handler fault happened).
    pub fn on_timeline(mut self, timeline: Timeline) -> Self {
        self.timeline = Some(timeline);
        self
    }

    /// Meets the call for `key` with the next fault due for it, if any:
    /// panics, waits, or returns the failure; `Ok(())` when no rule is due
    /// (or after a hang).
    pub async fn inject(&self, key: &str) -> Result<(), HandlerError> {
        let fault = {
            let mut state = self.lock();
            let Some(rule) = state
                .rules
                .iter_mut()
                .find(|r| r.key == key && r.remaining > 0)
            else {
                return Ok(());
            };
            rule.remaining -= 1;
            let fault = rule.fault;
            state.fired.push((key.to_owned(), fault));
            fault
        };
        if let Some(timeline) = &self.timeline {
            timeline.note(format!("handler fault: {} for key {key}", fault.name()));
        }
        match fault {
            Fault::Panic => panic!("injected panic for key {key}"),
            Fault::Hang(length) => {
                tokio::time::sleep(length).await;
                Ok(())
            }
            Fault::Transient => Err(HandlerError::transient(format!(
                "injected transient failure for key {key}"
            ))),
            Fault::Permanent => Err(HandlerError::permanent(format!(
                "injected permanent failure for key {key}"
            ))),
        }
    }

    /// Every fault that fired, in order: the key and the fault.
    pub fn fired(&self) -> Vec<(String, Fault)> {
        self.lock().fired.clone()
    }

    /// Whether every rule has fired all its times.
    pub fn all_fired(&self) -> bool {
        self.lock().rules.iter().all(|r| r.remaining == 0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald::ErrorClass;

    #[tokio::test]
    async fn rules_fire_per_key_in_order_and_only_their_times() {
        let faults = HandlerFaults::new()
            .fail_transiently("a", 2)
            .fail_permanently("a", 1)
            .hang("b", Duration::from_millis(1), 1);
        let class = |r: Result<(), HandlerError>| r.err().map(|e| e.class());
        assert_eq!(class(faults.inject("a").await), Some(ErrorClass::Transient));
        assert_eq!(class(faults.inject("c").await), None, "no rule for c");
        assert_eq!(class(faults.inject("a").await), Some(ErrorClass::Transient));
        assert!(!faults.all_fired());
        assert_eq!(class(faults.inject("a").await), Some(ErrorClass::Permanent));
        assert_eq!(class(faults.inject("a").await), None, "a's rules are spent");
        assert_eq!(class(faults.inject("b").await), None, "a hang then goes on");
        assert!(faults.all_fired());
        let fired: Vec<(String, &str)> = faults
            .fired()
            .into_iter()
            .map(|(k, f)| (k, f.name()))
            .collect();
        assert_eq!(
            fired,
            [
                ("a".to_owned(), "transient failure"),
                ("a".to_owned(), "transient failure"),
                ("a".to_owned(), "permanent failure"),
                ("b".to_owned(), "hang"),
            ]
        );
    }

    #[tokio::test]
    async fn a_panic_rule_panics_once() {
        let faults = HandlerFaults::new().panic("k", 1);
        let clone = faults.clone();
        let first = tokio::spawn(async move { clone.inject("k").await }).await;
        assert!(first.expect_err("panicked").is_panic());
        assert!(faults.inject("k").await.is_ok(), "spent after one panic");
    }
}
