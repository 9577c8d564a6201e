//! Run with: `cargo run -p herald-examples --example outbox`
//! (on an embedded Kafka; set `KAFKA_BROKERS=127.0.0.1:9092` after
//! `scripts/services.sh up` to run it on a real broker).
//!
//! A service that writes a row and its event in one transaction (the
//! transactional outbox) and runs the relay that publishes the events:
//! deposits are recorded in an SQLite file, each with a `DepositRecorded`
//! event enqueued in the same transaction; one transaction is rolled back,
//! and its event is never published. The relay wakes on each commit and
//! publishes each account's events in the order they were committed.
//! (`herald-postgres` offers the same `enqueue` for PostgreSQL, and its
//! store for the exactly-once `TransactionalRelay`.)

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::OutboxRecord;
use herald_examples::{Error, ExampleKafka};
use herald_kafka::{Publisher, PublisherConfig, Relay, RelayConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A deposit into an account.
#[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
struct DepositRecorded {
    #[event(id)]
    event_id: Uuid,
    #[event(key)]
    account: String,
    amount_cents: i64,
    #[event(time)]
    at: DateTime<Utc>,
}

/// The accounts topic's event family.
#[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "account")]
enum AccountEvent {
    DepositRecorded(DepositRecorded),
}

const PARTITIONS: i32 = 3;

/// Records a deposit and its event in one transaction; commits it unless
/// `roll_back`. Returns the event's id.
async fn deposit(
    db: &herald_sqlite::SqliteDatabase,
    topic: &str,
    account: &str,
    amount_cents: i64,
    roll_back: bool,
) -> Result<Uuid, Error> {
    let event = DepositRecorded {
        event_id: Uuid::new_v4(),
        account: account.to_owned(),
        amount_cents,
        at: Utc::now(),
    };
    // BEGIN IMMEDIATE: SQLite's one writer takes its lock up front.
    let mut tx = herald_sqlite::begin(db.pool()).await?;
    sqlx::query("INSERT INTO deposits (id, account, amount_cents) VALUES (?, ?, ?)")
        .bind(event.event_id.to_string())
        .bind(account)
        .bind(amount_cents)
        .execute(&mut *tx)
        .await?;
    let id = event.event_id;
    let record = OutboxRecord::new(
        topic,
        &AccountEvent::DepositRecorded(event),
        "/examples/outbox",
        None,
    )?;
    herald_sqlite::outbox::enqueue(&mut tx, &record).await?;
    if roll_back {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(id)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let run = Uuid::new_v4().simple().to_string();
    let topic = format!("accounts-{run}");
    let kafka =
        ExampleKafka::start(std::env::var("KAFKA_BROKERS").ok(), &[(&topic, PARTITIONS)]).await?;
    let brokers = kafka.brokers().to_owned();

    // The service's database: herald's outbox tables (migrated on open)
    // beside the service's own.
    let dir = std::env::temp_dir().join(format!("herald-example-{run}"));
    std::fs::create_dir_all(&dir)?;
    let db = herald_sqlite::SqliteConfig::new(dir.join("bank.db"))
        .open()
        .await?;
    sqlx::query("CREATE TABLE deposits (id TEXT PRIMARY KEY, account TEXT NOT NULL, amount_cents INTEGER NOT NULL)")
        .execute(db.pool())
        .await?;

    // The relay runs beside the service, woken by each commit.
    let publisher = Publisher::new(&PublisherConfig::new(&brokers, "/examples/outbox"))?;
    let relay = Relay::new(db.outbox(), publisher, RelayConfig::default());
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let relaying = tokio::spawn(relay.run(stop.clone().cancelled_owned()));

    let mut committed = Vec::new();
    for i in 0..12 {
        let account = format!("account-{}", i % 3);
        committed.push((
            account.clone(),
            deposit(&db, &topic, &account, 100 * (i + 1), false).await?,
        ));
    }
    let rolled_back = deposit(&db, &topic, "account-0", 999_999, true).await?;
    println!(
        "{} deposits committed with their events; one rolled back",
        committed.len()
    );

    let start = Instant::now();
    while herald_sqlite::outbox::status(db.pool()).await?.backlog > 0 {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the relay did not drain the outbox within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    relaying.await?;
    println!("relay: {} published", stats.published());

    // What reached Kafka: each account's events in commit order, and not
    // the rolled-back one.
    let published = kafka.read_to_end(&topic, "read_uncommitted").await?;
    for (account, id) in &published {
        println!("on {topic}: {account} {id}");
    }
    for account in ["account-0", "account-1", "account-2"] {
        let sent: Vec<Uuid> = committed
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, id)| *id)
            .collect();
        let read: Vec<Uuid> = published
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(read, sent, "{account}'s events once each, in commit order");
    }
    assert!(
        published.iter().all(|(_, id)| *id != rolled_back),
        "the rolled-back deposit's event was never published"
    );
    db.close().await;
    std::fs::remove_dir_all(&dir)?;
    println!("ok");
    Ok(())
}
