//! The store contract's conformance suite (`herald-conformance`) against
//! real PostgreSQL: a fresh migrated database per test (skipped loudly when
//! the server is missing, failing under CI), and the relay from it into
//! real Kafka.

use std::time::Duration;

use herald::HandlerError;
use herald_conformance::{BoxError, Harness, Rec};
use herald_postgres::{AfterPublish, Inbox, OutboxRecord, OutboxStatus, PgOutbox};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// PostgreSQL under test: one fresh database.
struct PgHarness {
    pool: PgPool,
    // Dropped last: dropping it drops the database.
    _db: herald_test::TestDatabase,
}

async fn harness() -> Option<PgHarness> {
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let pool = db.pool().await;
    herald_postgres::migrate(&pool).await.expect("migrate");
    Some(PgHarness { pool, _db: db })
}

impl Harness for PgHarness {
    type Outbox = PgOutbox;
    type Inbox = Inbox;
    type Tx = Transaction<'static, Postgres>;

    const NAME: &'static str = "postgres";
    const CLAIMS_SERIALIZED: bool = false;

    fn outboxes(&self, n: usize, after_publish: AfterPublish) -> Vec<PgOutbox> {
        (0..n)
            .map(|_| PgOutbox::new(self.pool.clone()).after_publish(after_publish))
            .collect()
    }

    async fn begin(&self) -> Self::Tx {
        self.pool.begin().await.expect("begin")
    }

    async fn enqueue<'a>(tx: &'a mut Self::Tx, records: &'a [Rec]) -> Result<(), BoxError> {
        let records: Vec<OutboxRecord> = records.iter().map(Rec::record).collect();
        herald_postgres::outbox::enqueue_all(tx, &records).await?;
        Ok(())
    }

    async fn commit(tx: Self::Tx) {
        tx.commit().await.expect("commit");
    }

    async fn rollback(tx: Self::Tx) {
        tx.rollback().await.expect("rollback");
    }

    async fn status(&self) -> OutboxStatus {
        herald_postgres::outbox::status(&self.pool)
            .await
            .expect("status")
    }

    async fn outbox_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM herald_outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    async fn purge_published(&self, retention: Duration, limit: i64) -> u64 {
        herald_postgres::outbox::purge_published(&self.pool, retention, limit)
            .await
            .expect("purge published")
    }

    fn inbox(&self, group: &str) -> Inbox {
        Inbox::new(self.pool.clone(), group)
    }

    async fn purge_processed(&self, retention: Duration, limit: i64) -> u64 {
        herald_postgres::inbox::purge_processed(&self.pool, retention, limit)
            .await
            .expect("purge processed")
    }

    async fn create_effects_table(&self) {
        sqlx::query("CREATE TABLE effects (event_id UUID NOT NULL, applied_by TEXT NOT NULL)")
            .execute(&self.pool)
            .await
            .expect("effects table");
    }

    async fn insert_effect(
        conn: &mut PgConnection,
        event_id: Uuid,
        by: &'static str,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects VALUES ($1, $2)")
            .bind(event_id)
            .bind(by)
            .execute(&mut *conn)
            .await
            .map_err(herald_postgres::classify)?;
        Ok(())
    }

    async fn effects(&self, event_id: Option<Uuid>) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE $1::uuid IS NULL OR event_id = $1")
            .bind(event_id)
            .fetch_one(&self.pool)
            .await
            .expect("count effects")
    }
}

herald_conformance::store_tests!(harness);
herald_conformance::relay_tests!(harness);
