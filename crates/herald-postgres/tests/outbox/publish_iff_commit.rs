//! Guarantee 1: an event reaches Kafka if and only if its transaction
//! committed.

use std::collections::BTreeSet;

use herald::Event;
use rand::Rng;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_committed_events_reach_kafka() {
    let Some(env) = env(3).await else {
        return;
    };
    let mut committed = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    let mut rng = rand::thread_rng();
    for i in 0..1000 {
        let events = [
            step(&format!("agg-{}", i % 50), i),
            step(&format!("agg-{}", (i + 7) % 50), i),
        ];
        let records: Vec<_> = events.iter().map(|e| record(env.topic.name(), e)).collect();
        let mut tx = env.pool.begin().await.expect("begin");
        // A business write beside the events, as a service would do.
        sqlx::query("SELECT 1")
            .execute(&mut *tx)
            .await
            .expect("business write");
        herald_postgres::outbox::enqueue_all(&mut tx, &records)
            .await
            .expect("enqueue");
        if rng.gen_ratio(1, 3) {
            tx.rollback().await.expect("rollback");
            rolled_back.extend(events.iter().map(Event::event_id));
        } else {
            tx.commit().await.expect("commit");
            committed.extend(events.iter().map(Event::event_id));
        }
    }
    // Retention never removes an event that is still pending.
    let purged =
        herald_postgres::outbox::purge_published(&env.pool, std::time::Duration::ZERO, 100_000)
            .await
            .expect("purge");
    assert_eq!(purged, 0, "nothing is published yet");
    let relay = relay(&env, env.pool.clone());
    let published = drain_all(&relay, &env.pool).await;
    assert_eq!(published, committed.len());

    let reads = read_to_end(&env.kafka, env.topic.name(), 3);
    let seen: BTreeSet<_> = reads.iter().map(|r| r.event_id).collect();
    assert_eq!(
        reads.len(),
        committed.len(),
        "no duplicates without a crash"
    );
    assert_eq!(seen, committed, "exactly the committed events");
    assert!(seen.is_disjoint(&rolled_back));
    assert!(!rolled_back.is_empty());

    let status = herald_postgres::outbox::status(&env.pool)
        .await
        .expect("status");
    assert_eq!(status.backlog, 0);
    assert_eq!(status.published_retained, committed.len() as i64);
    // The audit trail: each published event stays whole, out of the queue.
    let kept: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("SELECT event_id, length(payload) FROM herald_outbox")
            .fetch_all(&env.pool)
            .await
            .expect("published events");
    assert_eq!(
        kept.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>(),
        committed
    );
    assert!(kept.iter().all(|(_, length)| *length > 0));
    // Retention removes published rows (here: everything older than 0 s).
    let purged =
        herald_postgres::outbox::purge_published(&env.pool, std::time::Duration::ZERO, 100_000)
            .await
            .expect("purge");
    assert_eq!(purged, committed.len() as u64);
}
