//! The store contract's conformance suite (`herald-conformance`) against
//! SQLite: a temporary database file per test, opened the way the embedded
//! mode opens it (WAL, busy timeout, commit wake-ups), and the relay from
//! it into real Kafka.

use std::path::PathBuf;
use std::time::Duration;

use herald::HandlerError;
use herald_conformance::{BoxError, Harness, Rec};
use herald_sqlite::{
    AfterPublish, OutboxRecord, OutboxStatus, SqliteDatabase, SqliteInbox, SqliteOutbox,
};
use sqlx::{Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

/// SQLite under test: one fresh file.
struct SqliteHarness {
    db: SqliteDatabase,
    /// The outbox every relay handle clones: claims are serialized per
    /// outbox, one relay process per file.
    outbox: SqliteOutbox,
    dir: PathBuf,
}

impl Drop for SqliteHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn harness() -> Option<SqliteHarness> {
    let dir = std::env::temp_dir().join(format!("herald-sqlite-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = herald_sqlite::SqliteConfig::new(dir.join("herald.db"))
        .busy_timeout(Duration::from_secs(30))
        .open()
        .await
        .expect("open the SQLite file");
    let outbox = db.outbox();
    Some(SqliteHarness { db, outbox, dir })
}

impl Harness for SqliteHarness {
    type Outbox = SqliteOutbox;
    type Inbox = SqliteInbox;
    type Tx = Transaction<'static, Sqlite>;

    const NAME: &'static str = "sqlite";
    const CLAIMS_SERIALIZED: bool = true;

    fn outboxes(&self, n: usize, after_publish: AfterPublish) -> Vec<SqliteOutbox> {
        (0..n)
            .map(|_| self.outbox.clone().after_publish(after_publish))
            .collect()
    }

    async fn begin(&self) -> Self::Tx {
        herald_sqlite::begin(self.db.pool()).await.expect("begin")
    }

    async fn enqueue<'a>(tx: &'a mut Self::Tx, records: &'a [Rec]) -> Result<(), BoxError> {
        let records: Vec<OutboxRecord> = records.iter().map(Rec::record).collect();
        herald_sqlite::outbox::enqueue_all(tx, &records).await?;
        Ok(())
    }

    async fn commit(tx: Self::Tx) {
        tx.commit().await.expect("commit");
    }

    async fn rollback(tx: Self::Tx) {
        tx.rollback().await.expect("rollback");
    }

    async fn status(&self) -> OutboxStatus {
        herald_sqlite::outbox::status(self.db.pool())
            .await
            .expect("status")
    }

    async fn outbox_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM herald_outbox")
            .fetch_one(self.db.pool())
            .await
            .expect("count")
    }

    async fn purge_published(&self, retention: Duration, limit: i64) -> u64 {
        herald_sqlite::outbox::purge_published(self.db.pool(), retention, limit)
            .await
            .expect("purge published")
    }

    fn inbox(&self, group: &str) -> SqliteInbox {
        self.db.inbox(group)
    }

    async fn purge_processed(&self, retention: Duration, limit: i64) -> u64 {
        herald_sqlite::inbox::purge_processed(self.db.pool(), retention, limit)
            .await
            .expect("purge processed")
    }

    async fn create_effects_table(&self) {
        sqlx::query("CREATE TABLE effects (event_id TEXT NOT NULL, applied_by TEXT NOT NULL)")
            .execute(self.db.pool())
            .await
            .expect("effects table");
    }

    async fn insert_effect(
        conn: &mut SqliteConnection,
        event_id: Uuid,
        by: &'static str,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects VALUES (?1, ?2)")
            .bind(event_id.to_string())
            .bind(by)
            .execute(&mut *conn)
            .await
            .map_err(herald_sqlite::classify)?;
        Ok(())
    }

    async fn effects(&self, event_id: Option<Uuid>) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE ?1 IS NULL OR event_id = ?1")
            .bind(event_id.map(|id| id.to_string()))
            .fetch_one(self.db.pool())
            .await
            .expect("count effects")
    }
}

herald_conformance::store_tests!(harness);
herald_conformance::relay_tests!(harness);
