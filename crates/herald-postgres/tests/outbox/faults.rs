//! The exactly-once relay under the faults of the servers around it, each on
//! a server of the test's own so the crash disturbs no other test: a
//! PostgreSQL immediate stop (a crash) and restart, and a broker SIGKILL
//! and restart, each in the middle of a relay load. A `read_committed`
//! reader sees every committed event once, in aggregate order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use herald::Event;
use herald_kafka::{ExactlyOnceConfig, PublisherConfig, RelayConfig, TransactionalRelay};
use herald_postgres::PgOutbox;
use herald_test::private::{PrivateKafka, PrivatePostgres};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const AGGREGATES: usize = 100;
const TRANSACTIONS: usize = 1_000;
const PER_TRANSACTION: usize = 5;

/// What the writers know of their events: committed, or unknown (the
/// commit's answer was lost with the server; it may or may not have
/// committed, so the reader may see it once or not at all, never twice).
#[derive(Default)]
struct Written {
    committed: BTreeSet<Uuid>,
    unknown: BTreeSet<Uuid>,
}

/// Writes `TRANSACTIONS` transactions of `PER_TRANSACTION` events, each
/// aggregate's in order, retrying a transaction that failed before its
/// commit (the server is away); `written` says what became of each.
async fn write(pool: PgPool, topic: String, written: Arc<Mutex<Written>>) {
    let mut next_seq = vec![0u64; AGGREGATES];
    for t in 0..TRANSACTIONS {
        let events: Vec<TestEvent> = (0..PER_TRANSACTION)
            .map(|i| {
                let a = (t * PER_TRANSACTION + i) % AGGREGATES;
                next_seq[a] += 1;
                step(&format!("agg-{a}"), next_seq[a])
            })
            .collect();
        let records: Vec<_> = events.iter().map(|e| record(&topic, e)).collect();
        let ids = events.iter().map(Event::event_id);
        loop {
            let Ok(mut tx) = pool.begin().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if herald_postgres::outbox::enqueue_all(&mut tx, &records)
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let committed = tx.commit().await;
            let mut w = written.lock().await;
            match committed {
                Ok(()) => w.committed.extend(ids),
                // The answer was lost with the server: the transaction may
                // or may not have committed. Not retried (a retry of one
                // that did commit would write the same events twice).
                Err(_) => w.unknown.extend(ids),
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads the topic and checks: no event twice, every committed one there,
/// nothing that was not written, aggregate order.
fn check(reads: &[Read], written: &Written) {
    let mut seen = BTreeSet::new();
    for r in reads {
        assert!(seen.insert(r.event_id), "{} was read twice", r.event_id);
    }
    let lost: Vec<_> = written.committed.difference(&seen).collect();
    assert!(lost.is_empty(), "{} committed events were lost", lost.len());
    let foreign = seen
        .iter()
        .filter(|id| !written.committed.contains(id) && !written.unknown.contains(id))
        .count();
    assert_eq!(foreign, 0, "events nobody wrote");
    for (key, seqs) in sequences(reads) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
    eprintln!(
        "{} committed, {} unknown, {} read once each",
        written.committed.len(),
        written.unknown.len(),
        reads.len()
    );
}

async fn relay(brokers: &str, pool: PgPool, checkpoints: &str) -> TransactionalRelay<PgOutbox> {
    TransactionalRelay::new(
        PgOutbox::new(pool),
        &PublisherConfig::new(brokers, "/fault-tests"),
        RelayConfig {
            batch_size: 100,
            workers: 2,
            poll_interval: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        ExactlyOnceConfig {
            transactional_id_prefix: herald_test::unique_name("fault-relay"),
            checkpoint_topic: checkpoints.to_owned(),
            ..ExactlyOnceConfig::default()
        },
    )
    .await
    .expect("relay")
}

/// Waits until the relay has published `at_least` rows.
async fn published_at_least(pool: &PgPool, at_least: i64) {
    outbox_reaches(
        pool,
        "the relay to publish",
        Duration::from_secs(180),
        |s| s.published_retained >= at_least,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_during_a_relay_load_publishes_each_event_once() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    if herald_test::postgres().is_none() {
        return;
    }
    let postgres = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .expect("private PostgreSQL");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&postgres.url())
        .await
        .expect("pool");
    herald_postgres::migrate(&pool).await.expect("migrate");
    let topic = kafka.topic("fault-pg", 3).await;
    let checkpoints = kafka
        .topic(
            "fault-pg-checkpoints",
            i32::from(herald_postgres::RELAY_SLOTS),
        )
        .await;

    let written = Arc::new(Mutex::new(Written::default()));
    let writer = tokio::spawn(write(
        pool.clone(),
        topic.name().to_owned(),
        Arc::clone(&written),
    ));
    let relay = relay(kafka.brokers(), pool.clone(), checkpoints.name()).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone().cancelled_owned()));

    published_at_least(&pool, 1_000).await;
    tokio::task::block_in_place(|| postgres.crash());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| postgres.restart());
    writer.await.expect("writer");
    let written = written.lock().await;
    let minimum = i64::try_from(written.committed.len()).unwrap_or(i64::MAX);
    // Every committed event is published (and perhaps some unknown ones).
    published_at_least(&pool, minimum).await;
    drained(&pool, Duration::from_secs(120)).await;
    stop.cancel();
    running.await.expect("relay");

    let reads = read_to_end(&kafka, topic.name(), 3);
    check(&reads, &written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_during_a_relay_load_publishes_each_event_once() {
    let Some(env) = env(3).await else {
        return;
    };
    let mut broker = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("private Kafka");
    let private = herald_test::Kafka::at(broker.brokers());
    let topic = private.topic("fault-broker", 3).await;
    let checkpoints = private
        .topic(
            "fault-broker-checkpoints",
            i32::from(herald_postgres::RELAY_SLOTS),
        )
        .await;

    let written = Arc::new(Mutex::new(Written::default()));
    let writer = tokio::spawn(write(
        env.pool.clone(),
        topic.name().to_owned(),
        Arc::clone(&written),
    ));
    let relay = relay(&broker.brokers(), env.pool.clone(), checkpoints.name()).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone().cancelled_owned()));

    published_at_least(&env.pool, 1_000).await;
    broker.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("broker restarted");
    writer.await.expect("writer");
    let written = written.lock().await;
    assert!(written.unknown.is_empty(), "PostgreSQL never failed here");
    drained(&env.pool, Duration::from_secs(180)).await;
    stop.cancel();
    running.await.expect("relay");

    let reads = read_to_end(&private, topic.name(), 3);
    check(&reads, &written);
    drop(broker);
}
