//! Per-aggregate order with 3 relays and concurrent writers: each
//! aggregate's events appear on Kafka in creation order.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const AGGREGATES: usize = 60;
const EVENTS: u64 = 1500;
const WRITERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_keep_each_aggregate_in_creation_order() {
    let Some(env) = env(3).await else {
        return;
    };
    sqlx::query("CREATE TABLE aggregates (id TEXT PRIMARY KEY, next_seq BIGINT NOT NULL)")
        .execute(&env.pool)
        .await
        .expect("table");
    for a in 0..AGGREGATES {
        sqlx::query("INSERT INTO aggregates VALUES ($1, 0)")
            .bind(format!("agg-{a}"))
            .execute(&env.pool)
            .await
            .expect("aggregate");
    }

    // Three relays drain while the writers write.
    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay = relay(&env, env.pool.clone());
        let stop = stop.clone();
        relays.push(tokio::spawn(relay.run(stop.cancelled_owned())));
    }

    let topic: Arc<str> = Arc::from(env.topic.name());
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let pool = env.pool.clone();
        let topic = Arc::clone(&topic);
        writers.push(tokio::spawn(async move {
            for _ in 0..EVENTS as usize / WRITERS {
                let aggregate = format!("agg-{}", rand::thread_rng().gen_range(0..AGGREGATES));
                let mut tx = pool.begin().await.expect("begin");
                // The aggregate's row lock is the transaction's first write,
                // as in a real service: it serializes writers per aggregate.
                let seq: i64 = sqlx::query_scalar(
                    "UPDATE aggregates SET next_seq = next_seq + 1 WHERE id = $1 RETURNING next_seq - 1",
                )
                .bind(&aggregate)
                .fetch_one(&mut *tx)
                .await
                .expect("next seq");
                herald_postgres::outbox::enqueue(&mut tx, &record(&topic, &step(&aggregate, seq as u64)))
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let total = (EVENTS as usize / WRITERS) * WRITERS;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while herald_postgres::outbox::status(&env.pool)
        .await
        .expect("status")
        .backlog
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "relays did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for r in relays {
        r.await.expect("relay stopped");
    }

    let reads = read_to_end(&env.kafka, env.topic.name(), 3);
    assert_eq!(reads.len(), total, "every event once");
    let mut partition_of = std::collections::BTreeMap::new();
    for r in &reads {
        assert_eq!(
            *partition_of.entry(r.key.clone()).or_insert(r.partition),
            r.partition,
            "{} on one partition",
            r.key
        );
    }
    for (key, seqs) in sequences(&reads) {
        let expected: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{key} in creation order");
    }
}
