//! Relay slots: what an exactly-once relay owns while it publishes
//! ([`herald::SlotStore`] for [`PgOutbox`]).
//!
//! A slot is a fixed group of shards, `shard % RELAY_SLOTS` (4 slots of 16
//! shards each). A lease is one
//! transaction that holds the slot's advisory lock
//! (`pg_try_advisory_xact_lock(SLOT_LOCK_CLASS, slot)`) and the advisory
//! locks of the slot's shards, the same shard locks an at-least-once claim
//! takes, so the two kinds of relay never publish one shard at once. What a
//! lease claims follows the shard claim's ordering argument
//! (`sql/relay_claim.sql`) unchanged: one owner per shard, lowest ids first.
//!
//! # Why exactly once holds
//!
//! The relay (`herald_kafka::TransactionalRelay`) publishes a lease's batch
//! in a Kafka transaction under the slot's own `transactional.id`, with a
//! checkpoint record (slot, sequence, ids) in the same transaction, then
//! marks the batch in the lease ([`herald::SlotLease::published`]: its
//! pending rows are deleted) and may claim and publish further batches;
//! committing the lease stores the last sequence in `herald_relay_slots`,
//! all in one PostgreSQL transaction committed with
//! `synchronous_commit = on`. Each checkpoint lists the ids of every batch
//! the lease published so far, not only its own.
//!
//! - **Crash between the two commits.** Kafka holds checkpoint `s`,
//!   PostgreSQL still the sequence before the lease and the rows of all
//!   the lease's batches are pending. The next owner of
//!   the slot first fences every earlier producer of the slot
//!   (`init_transactions`, which also completes or aborts whatever
//!   transaction was open), then reads the slot's latest committed
//!   checkpoint and, finding it ahead of [`herald::SlotLease::sequence`], marks its
//!   ids ([`herald::SlotLease::recover`]) in the lease's transaction, before the
//!   claim: the claim cannot return them. A checkpoint lists every id its
//!   lease marks, recovered ones included, so if that lease dies in the
//!   same window, the next checkpoint still covers the earlier one; and
//!   since a lease's checkpoints list all its batches, the latest one
//!   alone covers every batch the lost lease published.
//! - **A batch that fails.** Kafka aborted it (a timeout, a refused
//!   record, a fence); the lease commits what [`herald::SlotLease::published`]
//!   marked, the batches before it, and the failed batch's rows stay
//!   pending for the slot's next lease, in order.
//! - **Zombies.** A relay that stalls (paused, partitioned, its host
//!   frozen) keeps its lease only while PostgreSQL keeps its session: the
//!   lease sets `idle_in_transaction_session_timeout`
//!   ([`PgOutbox::lease_timeout`]), and an ended session releases the
//!   locks. Before the next owner publishes anything it initializes the
//!   slot's transactional producer, which bumps the producer epoch: the
//!   stalled relay's open transaction is aborted, and its commit, if it
//!   ever wakes, is refused as fenced. Its PostgreSQL commit fails too (no
//!   session). Either its Kafka commit happened before the new owner's
//!   initialization, and the checkpoint recovery above marks it, or it is
//!   aborted and invisible to `read_committed` readers.
//! - **Async commits are not allowed here.** A lost PostgreSQL commit
//!   (`synchronous_commit = off` and a crash) could drop several leases'
//!   marks while Kafka kept their checkpoints; only the latest is read on
//!   recovery. So leases always commit synchronously: one WAL flush per
//!   lease, which carries one batch or, on a busy slot, several.
//!
//! The number of slots is fixed ([`RELAY_SLOTS`]): it is part of every
//! relay's transactional ids, and two relays that split shards differently
//! would not fence each other.

use std::time::Duration;

use herald::{Checkpoint, PendingRecord};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::outbox::{
    mark_published, pending_record, AfterPublish, PgOutbox, SHARDS, SHARD_LOCK_CLASS,
};
use crate::StoreError;

/// The number of relay slots: the most exactly-once relay transactions
/// that publish at once, across all relay processes. Fixed (see the
/// module documentation).
///
/// Why 4: a relay transaction costs a Kafka round trip or three whatever
/// its size (about 20-30 ms on the 2-core machine the benchmarks run on),
/// and a relay worker serves one slot per transaction. With 16 slots, 500
/// events/s spread over all of them and 4 workers, each transaction carried
/// 2-5 events and an event waited for its slot's turn: commit → consumer p50
/// 84 ms, p99 251 ms (`herald-bench relay-latency --compare delivery
/// --seconds 10 --rounds 2`). With 4 the same run gave p50 39-44 ms, p99
/// 165-174 ms, and the drain of a full outbox, where 4 workers keep 4
/// transactions busy either way, was unchanged (`herald-bench relay
/// --baseline at-least-once`: 0.71-0.73 of the at-least-once relay).
pub const RELAY_SLOTS: u16 = 4;

/// The first key of the advisory locks by which a lease owns a slot
/// ("hers" in ASCII); the slot is the second.
pub const SLOT_LOCK_CLASS: i32 = 0x6865_7273;

/// The default [`PgOutbox::lease_timeout`].
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// The shards of `slot`.
pub fn shards_of(slot: u16) -> Vec<i16> {
    (0..SHARDS)
        .filter(|shard| shard % RELAY_SLOTS == slot)
        .map(|shard| i16::try_from(shard).unwrap_or(i16::MAX))
        .collect()
}

/// A slot's last stored checkpoint, for status pages.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotCheckpoint {
    /// The slot.
    pub slot: u16,
    /// Its last checkpoint sequence.
    pub sequence: i64,
    /// When that checkpoint was stored.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Every slot's last stored checkpoint, by slot (slots that never
/// published are absent).
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<SlotCheckpoint>, StoreError> {
    let rows =
        sqlx::query("SELECT slot, sequence, checkpointed_at FROM herald_relay_slots ORDER BY slot")
            .fetch_all(pool)
            .await
            .map_err(StoreError::db("reading relay checkpoints"))?;
    Ok(rows
        .iter()
        .map(|row| SlotCheckpoint {
            slot: u16::try_from(row.get::<i16, _>("slot")).unwrap_or_default(),
            sequence: row.get("sequence"),
            at: row.get("checkpointed_at"),
        })
        .collect())
}

/// A slot owned by one transaction ([`herald::SlotLease`]).
pub struct PgSlotLease {
    tx: Transaction<'static, Postgres>,
    slot: u16,
    sequence: i64,
    /// The slot's shards whose locks this lease holds.
    shards: Vec<i16>,
    records: Vec<PendingRecord>,
    /// The shard of each claimed record.
    record_shards: Vec<i16>,
    /// How many of `records` (the first ones) are marked published in the
    /// lease's transaction.
    marked: usize,
    after_publish: AfterPublish,
}

impl std::fmt::Debug for PgSlotLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSlotLease")
            .field("slot", &self.slot)
            .field("sequence", &self.sequence)
            .field("shards", &self.shards)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl herald::SlotStore for PgOutbox {
    type Lease = PgSlotLease;

    fn slots(&self) -> u16 {
        RELAY_SLOTS
    }

    async fn slots_with_work(&self) -> Result<Vec<u16>, StoreError> {
        let shards: Vec<i16> = sqlx::query_scalar(crate::sql::RELAY_SHARDS.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("finding relay slots with unpublished rows"))?;
        let mut slots = Vec::new();
        for shard in shards {
            let slot = u16::try_from(shard).unwrap_or_default() % RELAY_SLOTS;
            if !slots.contains(&slot) {
                slots.push(slot);
            }
        }
        Ok(slots)
    }

    async fn wait_for_new_work(&self, timeout: Duration) {
        self.wait_for_new_rows(timeout).await;
    }

    async fn lease(&self, slot: u16) -> Result<Option<PgSlotLease>, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("starting a relay lease"))?;
        // One round trip for the settings and the locks. synchronous_commit
        // is set whatever the session's default (see the module
        // documentation: a lost lease commit is not recoverable). A shard
        // an at-least-once claim holds right now is left out of this lease
        // (mixed relays: see the module documentation). The shard locks are
        // only tried once the slot's is held (CASE evaluates its branch
        // after its condition); NULL means another relay holds the slot.
        let shards: Option<Vec<i16>> = sqlx::query_scalar(
            "SELECT CASE WHEN pg_try_advisory_xact_lock($3, $4) THEN ARRAY(
                        SELECT shard FROM unnest($5::smallint[]) AS s(shard)
                        WHERE pg_try_advisory_xact_lock($6, shard::int)
                        ORDER BY shard)
                    END
             FROM (SELECT set_config('idle_in_transaction_session_timeout', $1, true),
                          set_config('synchronous_commit', $2, true)) AS settings",
        )
        .bind(self.lease_timeout.as_millis().max(1).to_string())
        .bind("on")
        .bind(SLOT_LOCK_CLASS)
        .bind(i32::from(slot))
        .bind(shards_of(slot))
        .bind(SHARD_LOCK_CLASS)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("locking a relay slot"))?;
        let Some(shards) = shards else {
            return Ok(None);
        };
        // A statement of its own, after the locks: its snapshot sees the
        // previous owner's commit (the reason relay_claim.sql gives).
        let sequence: Option<i64> =
            sqlx::query_scalar("SELECT sequence FROM herald_relay_slots WHERE slot = $1")
                .bind(i16::try_from(slot).unwrap_or(i16::MAX))
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db("reading a relay slot's checkpoint"))?;
        Ok(Some(PgSlotLease {
            tx,
            slot,
            sequence: sequence.unwrap_or(0),
            shards,
            records: Vec::new(),
            record_shards: Vec::new(),
            marked: 0,
            after_publish: self.after_publish,
        }))
    }
}

impl PgSlotLease {
    /// Marks the claimed records not marked yet, in the lease's
    /// transaction: their pending rows go, so the lease's next claim
    /// (a new snapshot of the same transaction) does not find them again.
    async fn mark_unmarked(&mut self) -> Result<(), StoreError> {
        if self.marked == self.records.len() {
            return Ok(());
        }
        let ids: Vec<i64> = self.records[self.marked..].iter().map(|r| r.id).collect();
        let shards = &self.record_shards[self.marked..];
        mark_published(&mut self.tx, self.after_publish, shards, &ids).await?;
        self.marked = self.records.len();
        Ok(())
    }
}

impl herald::SlotLease for PgSlotLease {
    type Error = StoreError;

    fn slot(&self) -> u16 {
        self.slot
    }

    fn sequence(&self) -> i64 {
        self.sequence
    }

    async fn recover(&mut self, checkpoint: &Checkpoint) -> Result<u64, StoreError> {
        let pending: i64 = sqlx::query_scalar(include_str!("sql/relay_recover.sql"))
            .bind(&checkpoint.ids)
            .bind(self.after_publish == AfterPublish::Delete)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(StoreError::db(
                "marking a relay checkpoint's rows published",
            ))?;
        self.sequence = self.sequence.max(checkpoint.sequence);
        Ok(u64::try_from(pending).unwrap_or_default())
    }

    async fn claim(&mut self, max: usize) -> Result<&[PendingRecord], StoreError> {
        // Each shard's share of the batch, so that one busy shard does not
        // starve the slot's others; each takes its lowest pending ids, a
        // prefix of each of its aggregates (sql/relay_claim_slot.sql).
        let share = (max / self.shards.len().max(1)).max(1);
        let rows = sqlx::query(crate::sql::RELAY_CLAIM_SLOT.as_str())
            .bind(&self.shards)
            .bind(i64::try_from(share).unwrap_or(i64::MAX))
            .fetch_all(&mut *self.tx)
            .await
            .map_err(StoreError::db("claiming outbox rows"))?;
        // With fewer than one row per shard to give (max below the shard
        // count), the last shards' rows are left: a shard's rows come in
        // id order, so what is kept of each is still a prefix.
        let claimed = self.records.len();
        for row in rows.iter().take(max) {
            self.record_shards.push(row.get("shard"));
            self.records.push(pending_record(row));
        }
        Ok(&self.records[claimed..])
    }

    async fn published(&mut self) -> Result<(), StoreError> {
        self.mark_unmarked().await
    }

    async fn release(self) -> Result<(), StoreError> {
        self.tx
            .rollback()
            .await
            .map_err(StoreError::db("releasing a relay lease"))
    }

    async fn commit(mut self, sequence: i64) -> Result<(), StoreError> {
        // Only what `published` marked: records claimed after it belong to
        // a batch Kafka did not commit, and stay pending (their row locks
        // go with the transaction).
        sqlx::query(
            "INSERT INTO herald_relay_slots (slot, sequence) VALUES ($1, $2)
             ON CONFLICT (slot) DO UPDATE
             SET sequence = excluded.sequence, checkpointed_at = now()",
        )
        .bind(i16::try_from(self.slot).unwrap_or(i16::MAX))
        .bind(sequence)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db("storing a relay checkpoint"))?;
        self.tx
            .commit()
            .await
            .map_err(StoreError::db("committing the relay lease"))
    }
}
