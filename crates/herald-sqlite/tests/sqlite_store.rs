//! What only the SQLite store has: the file and its settings, commit
//! wake-ups for the relay, and a busy file reported as transient.

use std::time::Duration;

use herald::{OutboxBatch, OutboxStore};
use herald_sqlite::{OutboxRecord, SqliteConfig};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
struct Ping {
    #[event(id)]
    event_id: Uuid,
    #[event(key)]
    key: String,
    #[event(time)]
    at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "ping")]
enum PingEvent {
    Ping(Ping),
}

fn record(key: &str) -> OutboxRecord {
    let event = PingEvent::Ping(Ping {
        event_id: Uuid::new_v4(),
        key: key.to_owned(),
        at: chrono::Utc::now(),
    });
    OutboxRecord::new("pings", &event, "/sqlite-tests", None).expect("encode")
}

/// A directory removed at the end of the test.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("herald-sqlite-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_wakes_when_an_enqueue_commits() {
    let dir = TempDir::new();
    let db = SqliteConfig::new(dir.0.join("h.db"))
        .open()
        .await
        .expect("open");
    let outbox = db.outbox();
    // Without the wake-up this would wait an hour.
    let waiter = tokio::spawn(async move {
        outbox.wait_for_work(Duration::from_secs(3600)).await;
    });
    let mut tx = herald_sqlite::begin(db.pool()).await.expect("begin");
    herald_sqlite::outbox::enqueue(&mut tx, &record("a"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the relay was woken by the commit")
        .expect("waiter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_file_is_a_transient_error() {
    let dir = TempDir::new();
    let db = SqliteConfig::new(dir.0.join("h.db"))
        .busy_timeout(Duration::from_millis(50))
        .open()
        .await
        .expect("open");
    let holder = herald_sqlite::begin(db.pool()).await.expect("first writer");
    let error = herald_sqlite::begin(db.pool())
        .await
        .expect_err("the second writer times out");
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("starting a write transaction"),
        "{error}"
    );
    // Readers are not blocked by the writer (WAL).
    let status = herald_sqlite::outbox::status(db.pool())
        .await
        .expect("status");
    assert_eq!(status.backlog, 0);
    holder.rollback().await.expect("rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_survive_closing_and_reopening_the_file() {
    let dir = TempDir::new();
    let config = SqliteConfig::new(dir.0.join("h.db"));
    let db = config.open().await.expect("open");
    let mut tx = herald_sqlite::begin(db.pool()).await.expect("begin");
    herald_sqlite::outbox::enqueue_all(&mut tx, &[record("a"), record("a")])
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    db.close().await;

    // Migrations are idempotent; the rows are still there, in order.
    let db = config.open().await.expect("reopen");
    let batch = db.outbox().claim(10).await.expect("claim");
    assert_eq!(batch.records().len(), 2);
    assert!(batch.records()[0].id < batch.records()[1].id);
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(db.pool())
        .await
        .expect("journal mode");
    assert_eq!(journal, "wal");

    let missing = SqliteConfig::new(dir.0.join("absent.db"))
        .create_if_missing(false)
        .open()
        .await
        .expect_err("no such file");
    assert!(missing.to_string().contains("absent.db"), "{missing}");
}
