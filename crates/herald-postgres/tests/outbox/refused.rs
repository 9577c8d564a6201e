//! Issue #20, scenario 4: a record the relay's producer refuses for good
//! (larger than it may send) neither reorders its aggregate nor stalls the
//! others. It is counted, then parked with its aggregate: the aggregate's
//! later events wait behind it, every other aggregate is published. A
//! person ends the park: discard (the later events follow, it never
//! does) or, once the cause is fixed, retry (it is published, then the
//! later events, in order). Both relays.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_kafka::{PublisherConfig, Relay, RelayConfig, TransactionalRelay};
use herald_postgres::refusals::{self, Resolution};
use herald_postgres::PgOutbox;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const AGGREGATES: usize = 20;
const PER_AGGREGATE: u64 = 5;
const POISONED: &str = "key-3";
/// What the relays' producers may send in these tests: the poisoned event
/// is larger, every other one far smaller.
const MAX_BYTES: &str = "10000";

/// Enqueues every aggregate's events, one transaction per aggregate, with
/// `POISONED`'s second event padded past `MAX_BYTES`; returns the event ids
/// by aggregate, in order.
async fn fill(pool: &PgPool, topic: &str) -> Vec<(String, Vec<Uuid>)> {
    let mut out = Vec::new();
    for a in 0..AGGREGATES {
        let key = format!("key-{a}");
        let events: Vec<TestEvent> = (0..PER_AGGREGATE).map(|seq| step(&key, seq)).collect();
        let mut records: Vec<_> = events.iter().map(|e| record(topic, e)).collect();
        if key == POISONED {
            let mut body: serde_json::Value =
                serde_json::from_slice(&records[1].envelope.payload).expect("json");
            body["pad"] = serde_json::Value::String("x".repeat(20_000));
            records[1].envelope.payload = serde_json::to_vec(&body).expect("json");
        }
        let mut tx = pool.begin().await.expect("begin");
        herald_postgres::outbox::enqueue_all(&mut tx, &records)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        out.push((key, records.iter().map(|r| r.envelope.event_id).collect()));
    }
    out
}

/// Runs `pass` until `done` holds (bounded), ignoring pass errors (a pass
/// that meets the refused record fails; that is the point).
async fn drive<F>(what: &str, mut pass: impl AsyncFnMut() -> Result<usize, String>, mut done: F)
where
    F: AsyncFnMut() -> bool,
{
    let start = std::time::Instant::now();
    let (mut passes, mut failed, mut last_error) = (0, 0, None);
    loop {
        passes += 1;
        let pass_started = std::time::Instant::now();
        if let Err(error) = pass().await {
            failed += 1;
            eprintln!(
                "relay pass failed after {:?} (expected while refused): {error}",
                pass_started.elapsed()
            );
            last_error = Some(error);
        }
        if done().await {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what} ({passes} passes, {failed} failed, the last failure: {last_error:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn parked(pool: &PgPool) -> Vec<refusals::Refused> {
    refusals::list(pool)
        .await
        .expect("refusals")
        .into_iter()
        .filter(|r| r.parked_at.is_some())
        .collect()
}

/// Kafka holds, per aggregate, exactly the events `expected` says, in order
/// (read_committed).
fn assert_published(env: &Env, expected: &[(String, Vec<Uuid>)]) {
    let reads = read_to_end(&env.kafka, env.topic.name(), 3);
    let mut seen = BTreeSet::new();
    for r in &reads {
        assert!(seen.insert(r.event_id), "{} published twice", r.event_id);
    }
    for (key, ids) in expected {
        let got: Vec<Uuid> = reads
            .iter()
            .filter(|r| &r.key == key)
            .map(|r| r.event_id)
            .collect();
        assert_eq!(&got, ids, "{key}: published events, in order");
    }
}

/// The events Kafka should hold: all, but for `POISONED` only `keep`
/// (indexes into its events).
fn expected(all: &[(String, Vec<Uuid>)], keep: &[usize]) -> Vec<(String, Vec<Uuid>)> {
    all.iter()
        .map(|(key, ids)| {
            let ids = if key == POISONED {
                keep.iter().map(|&i| ids[i]).collect()
            } else {
                ids.clone()
            };
            (key.clone(), ids)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_a_refused_event_parks_its_aggregate_and_a_discard_lets_it_flow() {
    let Some(env) = env(3).await else {
        return;
    };
    let all = fill(&env.pool, env.topic.name()).await;
    let publisher = herald_kafka::Publisher::new(
        &PublisherConfig::new(env.kafka.brokers(), "/outbox-tests")
            .set("message.max.bytes", MAX_BYTES),
    )
    .expect("publisher");
    let relay = Relay::new(
        PgOutbox::new(env.pool.clone()).park_after(2),
        publisher,
        RelayConfig {
            batch_size: 200,
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    );
    let pool = env.pool.clone();
    drive(
        "the refused event parked and the rest published",
        async || relay.drain().await.map_err(|e| e.to_string()),
        async || {
            let status = herald_postgres::outbox::status(&pool)
                .await
                .expect("status");
            // Left: the poisoned aggregate's three later events.
            parked(&pool).await.len() == 1 && status.backlog == 3
        },
    )
    .await;
    let parked_now = parked(&env.pool).await;
    assert_eq!(parked_now[0].event_id, all[3].1[1]);
    assert!(parked_now[0].attempts >= 2, "{parked_now:?}");
    assert!(
        parked_now[0].last_error.contains("too large"),
        "{parked_now:?}"
    );
    assert_eq!(relay.stats().parked(), 1);
    // Nothing of the poisoned aggregate after its first event; all others.
    assert_published(&env, &expected(&all, &[0]));

    assert!(refusals::resolve(
        &env.pool,
        all[3].1[1],
        Resolution::Discard,
        "tester",
        "never valid"
    )
    .await
    .expect("discard"));
    drain_all(&relay, &env.pool).await;
    assert_published(&env, &expected(&all, &[0, 2, 3, 4]));
    let audit = refusals::audit(&env.pool, 10).await.expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (
            audit[0].action.as_str(),
            audit[0].actor.as_str(),
            audit[0].reason.as_str()
        ),
        ("discard", "tester", "never valid")
    );
    assert!(parked(&env.pool).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_a_refused_event_stalls_no_one_and_a_retry_publishes_it_in_order() {
    let Some(env) = env(3).await else {
        return;
    };
    let exactly = Exactly::new(&env.kafka).await;
    let all = fill(&env.pool, env.topic.name()).await;
    let config = RelayConfig {
        batch_size: 50,
        poll_interval: Duration::from_millis(100),
        workers: 2,
        ..RelayConfig::default()
    };
    let limited = TransactionalRelay::new(
        PgOutbox::new(env.pool.clone()).park_after(2),
        &PublisherConfig::new(env.kafka.brokers(), "/outbox-tests")
            .set("message.max.bytes", MAX_BYTES),
        config.clone(),
        exactly.config(),
    )
    .await
    .expect("relay");
    let pool = env.pool.clone();
    drive(
        "the refused event parked and the rest published",
        async || limited.drain().await.map_err(|e| e.to_string()),
        async || {
            let status = herald_postgres::outbox::status(&pool)
                .await
                .expect("status");
            let n = parked(&pool).await.len();
            n == 1 && status.backlog == 3
        },
    )
    .await;
    assert_eq!(limited.stats().parked(), 1);
    // The aborted transactions' records are invisible: every other
    // aggregate exactly once, the poisoned one up to its refused event.
    assert_published(&env, &expected(&all, &[0]));
    drop(limited);

    // The cause is fixed (the relay may send larger records now), and a
    // person retries: the parked event, then its aggregate's later events.
    let fixed = exactly
        .relay(env.kafka.brokers(), PgOutbox::new(env.pool.clone()), None)
        .await;
    assert!(refusals::resolve(
        &env.pool,
        all[3].1[1],
        Resolution::Retry,
        "tester",
        "limit raised"
    )
    .await
    .expect("retry"));
    drain_exactly(&fixed, &env.pool).await;
    assert_published(&env, &expected(&all, &[0, 1, 2, 3, 4]));
    let audit = refusals::audit(&env.pool, 10).await.expect("audit");
    assert_eq!(audit[0].action, "retry");
    assert!(refusals::list(&env.pool).await.expect("list").is_empty());
}
