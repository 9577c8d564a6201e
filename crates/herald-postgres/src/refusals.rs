//! Records the broker refuses for good (larger than the topic takes,
//! invalid, not authorized): counted, then parked with their aggregate,
//! until a person retries or discards them. The table and its argument are
//! in the migration `20261202000001_herald_outbox_refused.sql`; the claims
//! skip parked aggregates (`sql/relay_claim.sql`).
//!
//! Why park instead of retrying forever: every pass that claims a refused
//! record fails with it (the exactly-once relay aborts the whole slot's
//! transaction), so one bad record would hold back every aggregate of its
//! slot, with growing backoffs. Why park the aggregate and not only the
//! record: its later events must not reach Kafka before it.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::StoreError;

/// Refusals of one event before it is parked (default of
/// [`crate::PgOutbox::park_after`]).
pub const DEFAULT_PARK_AFTER: u32 = 3;

/// A refused event, as `orders outbox status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The event.
    pub event_id: Uuid,
    /// Its aggregate.
    pub aggregate_type: String,
    /// Its aggregate's id.
    pub aggregate_id: String,
    /// Where it was to go.
    pub topic: String,
    /// Refusals counted since it was (re)queued.
    pub attempts: i32,
    /// The broker's last word on it.
    pub last_error: String,
    /// When it was first refused.
    pub first_refused_at: DateTime<Utc>,
    /// When it was last refused.
    pub last_refused_at: DateTime<Utc>,
    /// When it was parked; `None` while it is still retried.
    pub parked_at: Option<DateTime<Utc>>,
}

/// One retry or discard of a parked event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// The event.
    pub event_id: Uuid,
    /// `retry` or `discard`.
    pub action: String,
    /// Who did it (as given, or the OS user).
    pub actor: String,
    /// Why, as given.
    pub reason: String,
    /// The refusal it ended.
    pub last_error: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// Counts a refusal of outbox row `id` with `error`, and parks the event
/// (and with it its aggregate) once it was refused `park_after` times.
/// Returns whether this refusal parked it (`false` for the refusals before
/// and for a late one of an event already parked).
pub async fn record(
    pool: &PgPool,
    id: i64,
    error: &str,
    park_after: u32,
) -> Result<bool, StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(StoreError::db("starting to record a refusal"))?;
    let attempts: Option<i32> = sqlx::query_scalar(
        "INSERT INTO herald_outbox_refused
             (id, event_id, shard, aggregate_type, aggregate_id, topic, attempts, last_error)
         SELECT o.id, o.event_id, herald_outbox_shard(o.aggregate_type, o.aggregate_id),
                o.aggregate_type, o.aggregate_id, o.topic, 1, $2
         FROM herald_outbox o
         WHERE o.id = $1
         ON CONFLICT (id) DO UPDATE
             SET attempts = herald_outbox_refused.attempts + 1,
                 last_error = EXCLUDED.last_error,
                 last_refused_at = now()
         RETURNING attempts",
    )
    .bind(id)
    .bind(error)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StoreError::db("recording a refusal"))?;
    let Some(attempts) = attempts else {
        // The row is gone (retention, a discard): nothing to count.
        return Ok(false);
    };
    let mut parked = false;
    if u32::try_from(attempts).unwrap_or(u32::MAX) >= park_after.max(1) {
        // Two relay workers may both have claimed the event before the
        // first one's park committed: only the refusal that parks it says
        // so, so that the event is counted as parked once.
        parked = sqlx::query(
            "UPDATE herald_outbox_refused SET parked_at = now()
             WHERE id = $1 AND parked_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("parking a refused event"))?
        .rows_affected()
            == 1;
        // Out of the queue: the claims skip its aggregate from now on.
        sqlx::query("DELETE FROM herald_outbox_pending WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("parking a refused event"))?;
    }
    tx.commit()
        .await
        .map_err(StoreError::db("recording a refusal"))?;
    Ok(parked)
}

/// Every refused event, parked or still retried, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Refused>, StoreError> {
    let rows = sqlx::query(
        "SELECT event_id, aggregate_type, aggregate_id, topic, attempts, last_error,
                first_refused_at, last_refused_at, parked_at
         FROM herald_outbox_refused ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::db("listing refused events"))?;
    Ok(rows
        .iter()
        .map(|row| Refused {
            event_id: row.get("event_id"),
            aggregate_type: row.get("aggregate_type"),
            aggregate_id: row.get("aggregate_id"),
            topic: row.get("topic"),
            attempts: row.get("attempts"),
            last_error: row.get("last_error"),
            first_refused_at: row.get("first_refused_at"),
            last_refused_at: row.get("last_refused_at"),
            parked_at: row.get("parked_at"),
        })
        .collect())
}

/// How many events are parked (a metric's source).
pub async fn parked(pool: &PgPool) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT count(*) FROM herald_outbox_refused WHERE parked_at IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(StoreError::db("counting parked events"))
}

/// What a person decides about a parked event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Queue it again (after fixing what the broker refused: the topic's
    /// size limit, an ACL); its refusals are counted afresh.
    Retry,
    /// Never publish it; its aggregate's later events flow.
    Discard,
}

impl Resolution {
    fn as_str(self) -> &'static str {
        match self {
            Resolution::Retry => "retry",
            Resolution::Discard => "discard",
        }
    }
}

/// Ends the park of `event_id` as `resolution` says, recorded in the audit
/// table with `actor` and `reason`, in one transaction. Returns `false`
/// when the event is not parked (nothing changes then).
pub async fn resolve(
    pool: &PgPool,
    event_id: Uuid,
    resolution: Resolution,
    actor: &str,
    reason: &str,
) -> Result<bool, StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(StoreError::db("starting to resolve a parked event"))?;
    let parked = sqlx::query(
        "DELETE FROM herald_outbox_refused
         WHERE event_id = $1 AND parked_at IS NOT NULL
         RETURNING id, shard, last_error",
    )
    .bind(event_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StoreError::db("resolving a parked event"))?;
    let Some(parked) = parked else {
        return Ok(false);
    };
    let (id, shard, last_error): (i64, i16, String) = (
        parked.get("id"),
        parked.get("shard"),
        parked.get("last_error"),
    );
    if resolution == Resolution::Retry {
        sqlx::query(
            "INSERT INTO herald_outbox_pending (shard, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(shard)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("queueing a parked event again"))?;
    }
    sqlx::query(
        "INSERT INTO herald_outbox_audit (event_id, action, actor, reason, last_error)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event_id)
    .bind(resolution.as_str())
    .bind(actor)
    .bind(reason)
    .bind(&last_error)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::db("auditing a parked event's resolution"))?;
    tx.commit()
        .await
        .map_err(StoreError::db("resolving a parked event"))?;
    Ok(true)
}

/// The audit trail, newest first, at most `limit` entries.
pub async fn audit(pool: &PgPool, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = sqlx::query(
        "SELECT event_id, action, actor, reason, last_error, at
         FROM herald_outbox_audit ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(StoreError::db("reading the outbox audit"))?;
    Ok(rows
        .iter()
        .map(|row| AuditEntry {
            event_id: row.get("event_id"),
            action: row.get("action"),
            actor: row.get("actor"),
            reason: row.get("reason"),
            last_error: row.get("last_error"),
            at: row.get("at"),
        })
        .collect())
}
