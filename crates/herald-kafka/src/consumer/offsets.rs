//! Which offset of a partition is safe to commit.
//!
//! Records of one partition finish out of order (different keys run in
//! parallel). The committed offset must never pass a record that is not done,
//! or a crash would lose it: it is the lowest offset still pending, or one
//! past the highest offset seen when nothing is pending.

use std::collections::BTreeSet;

/// Offsets of one partition that were received but are not done yet.
#[derive(Debug, Default)]
pub(crate) struct PartitionOffsets {
    pending: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last offset committed (or being committed) by this instance.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// A record at `offset` was received and is now pending.
    pub fn received(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// The record at `offset` is done (handled or dead-lettered).
    pub fn done(&mut self, offset: i64) {
        self.pending.remove(&offset);
    }

    /// The consumer's position (librdkafka's next offset for the
    /// application) is `position`. Offsets below it that were never handed
    /// over are transaction markers (a transactional producer ends each
    /// transaction with one): when nothing is pending they count as done,
    /// so the commit reaches the partition's end, as a Java consumer's
    /// does, and the group's lag can reach zero.
    ///
    /// librdkafka advances the position past a marker only when the
    /// application polls past it, after every record before it, so a
    /// position taken when every polled record was [`Self::received`]
    /// passes no record that was not.
    ///
    /// That holds before the first record too: librdkafka forgets the
    /// position when a partition stops being fetched (revoked) and on a
    /// seek, so a position on a partition that handed over nothing in this
    /// assignment was reached by markers and aborted records alone, as in
    /// a partition that holds nothing but an aborted transaction.
    pub fn passed(&mut self, position: i64) {
        if self.pending.is_empty() && self.next.is_none_or(|next| position > next) {
            self.next = Some(position);
        }
    }

    /// The offset to commit: the next record to read after a restart.
    pub fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }

    /// The offset to commit if it moved since the last commit; records it as
    /// committed.
    pub fn take_commit(&mut self) -> Option<i64> {
        let offset = self.committable()?;
        if self.committed.is_some_and(|c| c >= offset) {
            return None;
        }
        self.committed = Some(offset);
        Some(offset)
    }

    /// Forgets a commit that failed, so the next pass tries again.
    pub fn commit_failed(&mut self) {
        self.committed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_commits_past_a_pending_record() {
        let mut p = PartitionOffsets::default();
        assert_eq!(p.committable(), None);
        for o in 10..15 {
            p.received(o);
        }
        p.done(12);
        p.done(13);
        assert_eq!(p.take_commit(), Some(10), "10 is still pending");
        p.done(10);
        assert_eq!(p.take_commit(), Some(11));
        assert_eq!(p.take_commit(), None, "nothing moved");
        p.done(11);
        p.done(14);
        assert_eq!(p.take_commit(), Some(15), "all done: one past the highest");
    }

    #[test]
    fn the_position_moves_the_commit_past_markers_only_when_nothing_is_pending() {
        let mut p = PartitionOffsets::default();
        assert_eq!(p.committable(), None, "nothing received: nothing to commit");
        p.passed(2);
        assert_eq!(
            p.committable(),
            Some(2),
            "an aborted record and its marker, before any record"
        );
        p.received(3);
        p.passed(5);
        assert_eq!(p.committable(), Some(3), "offset 3 is still pending");
        p.done(3);
        assert_eq!(p.committable(), Some(4));
        p.passed(5);
        assert_eq!(p.committable(), Some(5), "offset 4 was a marker");
        p.passed(2);
        assert_eq!(p.committable(), Some(5), "never backwards");
    }

    #[test]
    fn a_failed_commit_is_retried() {
        let mut p = PartitionOffsets::default();
        p.received(0);
        p.done(0);
        assert_eq!(p.take_commit(), Some(1));
        p.commit_failed();
        assert_eq!(p.take_commit(), Some(1));
    }
}
