//! Which outbox shards a relay process tries next.
//!
//! Finding the shards with unpublished rows (`sql/relay_shards.sql`) costs
//! one index descent per shard, and each descent steps over the index
//! entries of rows published moments ago: they stay in the index until
//! PostgreSQL knows no snapshot can still see them, and until then every
//! scan that meets them fetches their heap tuples. With a search before
//! every claim of every relay worker, a claim took 30.9 ms (median) in
//! `herald-bench relay --records 300000 --after-publish delete`; with the
//! rotation, 11.1 ms. So a process searches at most every
//! [`REDISCOVER_AFTER`] (or when it has run out of shards), one worker at a
//! time while the others still have shards to try, and its workers take
//! shards from the rotation in between: oldest-waiting first after each
//! search, and a shard that filled a batch goes to the back to be served
//! again after the others.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a search's list of shards is used before the next search; it
/// bounds how long a shard that gained rows meanwhile waits to be noticed
/// while others are busy (an idle relay is woken by NOTIFY and searches at
/// once, its rotation being empty).
pub(crate) const REDISCOVER_AFTER: Duration = Duration::from_millis(250);

/// The shards to try, in order, and when they were found.
#[derive(Debug, Default)]
pub(crate) struct ShardRotation {
    queue: VecDeque<i16>,
    found_at: Option<Instant>,
    searching: bool,
}

impl ShardRotation {
    /// Whether the calling claim should search now; if so, the search is
    /// its to finish ([`found`](Self::found)) or give up
    /// ([`search_failed`](Self::search_failed)). A stale rotation that still
    /// has shards is left to the one search already under way.
    pub(crate) fn start_search(&mut self, now: Instant) -> bool {
        let stale = self.queue.is_empty()
            || self
                .found_at
                .is_none_or(|found| now.duration_since(found) >= REDISCOVER_AFTER);
        let search = stale && (self.queue.is_empty() || !self.searching);
        self.searching |= search;
        search
    }

    /// Replaces the rotation with a search's result (oldest-waiting first).
    pub(crate) fn found(&mut self, shards: Vec<i16>, now: Instant) {
        self.queue = shards.into();
        self.found_at = Some(now);
        self.searching = false;
    }

    /// A search failed: the next stale claim searches again.
    pub(crate) fn search_failed(&mut self) {
        self.searching = false;
    }

    /// The next shard not in `tried`; the tried ones it passes go to the
    /// back. `None` when every shard in the rotation was tried (or there are
    /// none).
    pub(crate) fn next_untried(&mut self, tried: &[i16]) -> Option<i16> {
        for _ in 0..self.queue.len() {
            let shard = self.queue.pop_front()?;
            if !tried.contains(&shard) {
                return Some(shard);
            }
            self.queue.push_back(shard);
        }
        None
    }

    /// Puts `shard` at the back: it has more rows (it filled a batch), or
    /// another relay held it.
    pub(crate) fn again(&mut self, shard: i16) {
        if !self.queue.contains(&shard) {
            self.queue.push_back(shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_search_is_used_until_it_ages_or_runs_out() {
        let start = Instant::now();
        let mut rotation = ShardRotation::default();
        assert!(rotation.start_search(start), "nothing found yet");
        rotation.found(vec![7, 3], start);
        assert!(!rotation.start_search(start + REDISCOVER_AFTER / 2));
        assert!(rotation.start_search(start + REDISCOVER_AFTER), "aged");
        rotation.found(vec![7, 3], start);
        assert_eq!(rotation.next_untried(&[]), Some(7));
        assert_eq!(rotation.next_untried(&[]), Some(3));
        assert!(rotation.start_search(start), "ran out");
    }

    #[test]
    fn one_search_at_a_time_while_there_are_shards_to_try() {
        let start = Instant::now();
        let aged = start + REDISCOVER_AFTER;
        let mut rotation = ShardRotation::default();
        rotation.found(vec![1, 2], start);
        assert!(rotation.start_search(aged));
        assert!(!rotation.start_search(aged), "another worker is searching");
        rotation.search_failed();
        assert!(rotation.start_search(aged), "the failed search is retried");
        // Out of shards, a worker searches even while another one does.
        let _ = (rotation.next_untried(&[]), rotation.next_untried(&[]));
        assert!(rotation.start_search(aged));
    }

    #[test]
    fn a_shard_served_again_goes_behind_the_others_once() {
        let mut rotation = ShardRotation::default();
        rotation.found(vec![1, 2, 3], Instant::now());
        let first = rotation.next_untried(&[]).expect("a shard");
        rotation.again(first);
        rotation.again(first);
        let order: Vec<i16> = std::iter::from_fn(|| rotation.next_untried(&[])).collect();
        assert_eq!(order, vec![2, 3, 1]);
    }

    #[test]
    fn shards_a_claim_tried_are_passed_over_and_kept() {
        let mut rotation = ShardRotation::default();
        rotation.found(vec![1, 2, 3], Instant::now());
        assert_eq!(rotation.next_untried(&[1, 2]), Some(3));
        assert_eq!(rotation.next_untried(&[1, 2, 3]), None, "all tried");
        let left: Vec<i16> = std::iter::from_fn(|| rotation.next_untried(&[])).collect();
        assert_eq!(left, vec![1, 2], "tried shards stay for other claims");
    }
}
