//! Crash safety: the relay process is SIGKILLed at random points (between
//! claim, publish and mark) under load; every committed event still reaches
//! Kafka, and a re-published one carries the same event id.

use std::collections::BTreeSet;
use std::process::Child;
use std::time::Duration;

use herald::Event;
use herald_kafka::{Publisher, PublisherConfig, Relay, RelayConfig};
use herald_postgres::PgOutbox;
use rand::Rng;
use sqlx::postgres::PgPoolOptions;

use crate::support::*;

const ENV_URL: &str = "HERALD_RELAY_CHILD_DATABASE_URL";
const KILLS: usize = 4;
const TRANSACTIONS: usize = 2000;
const PER_TRANSACTION: usize = 5;

/// The child process: a relay that runs until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of crash::relay_killed_at_random_points_loses_nothing"]
async fn relay_child() {
    let Ok(url) = std::env::var(ENV_URL) else {
        return;
    };
    let kafka = herald_test::kafka().expect("kafka");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .expect("pool");
    let publisher =
        Publisher::new(&PublisherConfig::new(kafka.brokers(), "/crash-tests")).expect("publisher");
    let relay = Relay::new(
        PgOutbox::new(pool),
        publisher,
        RelayConfig {
            batch_size: 100,
            ..RelayConfig::default()
        },
    );
    relay.run(std::future::pending()).await;
}

fn spawn_child(url: &str) -> Child {
    spawn_child_test("crash::relay_child", &[(ENV_URL, url)])
}

async fn published(pool: &sqlx::PgPool) -> i64 {
    herald_postgres::outbox::status(pool)
        .await
        .expect("status")
        .published_retained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_at_random_points_loses_nothing() {
    let Some(env) = env(3).await else {
        return;
    };
    // Writers keep committing while the relay dies and restarts.
    let writer = {
        let pool = env.pool.clone();
        let topic = env.topic.name().to_owned();
        tokio::spawn(async move {
            let mut committed = BTreeSet::new();
            for t in 0..TRANSACTIONS {
                let events: Vec<TestEvent> = (0..PER_TRANSACTION)
                    .map(|i| step(&format!("agg-{}", (t * PER_TRANSACTION + i) % 97), t as u64))
                    .collect();
                enqueue_committed_all(&pool, &topic, &events).await;
                committed.extend(events.iter().map(Event::event_id));
            }
            committed
        })
    };

    let total = (TRANSACTIONS * PER_TRANSACTION) as i64;
    let mut rng = rand::thread_rng();
    for kill in 0..KILLS {
        let before = published(&env.pool).await;
        let mut child = spawn_child(env.db.url());
        let target = before + rng.gen_range(200..total / (KILLS as i64 + 1));
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while published(&env.pool).await < target {
            assert!(
                std::time::Instant::now() < deadline,
                "relay child made no progress"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        eprintln!(
            "kill {kill}: {} rows marked published",
            published(&env.pool).await
        );
    }
    let committed = writer.await.expect("writer");

    // A last relay finishes the job.
    let relay = relay(&env, env.pool.clone());
    drain_all(&relay, &env.pool).await;

    let reads = read_to_end(&env.kafka, env.topic.name(), 3);
    let seen: BTreeSet<_> = reads.iter().map(|r| r.event_id).collect();
    assert_eq!(seen, committed, "every committed event reached Kafka");
    eprintln!(
        "{} records on Kafka for {} events: {} re-published after kills",
        reads.len(),
        committed.len(),
        reads.len() - committed.len()
    );
    for r in &reads {
        assert_eq!(
            r.headers["ce_id"],
            r.event_id.to_string(),
            "a duplicate keeps its event id"
        );
    }
    // Per aggregate the first occurrences are in creation order.
    for (key, seqs) in sequences(&reads) {
        let mut firsts = Vec::new();
        for s in seqs {
            if !firsts.contains(&s) {
                firsts.push(s);
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(firsts, sorted, "{key}");
    }
}
