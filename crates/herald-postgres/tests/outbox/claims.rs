//! Two relay processes claiming at once (the store level, no Kafka): each
//! claim owns whole shards, so open claims never share an aggregate, each
//! holds a prefix of every aggregate it touches, and together they take
//! every row exactly once.

use std::collections::{BTreeMap, HashSet};

use herald::{OutboxBatch as _, OutboxStore as _};
use herald_postgres::PgOutbox;

use crate::support::*;

const AGGREGATES: usize = 200;
const PER_AGGREGATE: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_claims_share_no_aggregate_and_miss_no_row() {
    let Some(env) = env(1).await else {
        return;
    };
    // Each aggregate's events are enqueued in order; ids follow.
    let mut tx = env.pool.begin().await.expect("begin");
    let events = steps(AGGREGATES, PER_AGGREGATE);
    let records: Vec<_> = events.iter().map(|e| record(env.topic.name(), e)).collect();
    herald_postgres::outbox::enqueue_all(&mut tx, &records)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let all: BTreeMap<i64, String> = sqlx::query_as("SELECT id, record_key FROM herald_outbox")
        .fetch_all(&env.pool)
        .await
        .expect("rows")
        .into_iter()
        .collect();
    assert_eq!(all.len(), AGGREGATES * PER_AGGREGATE as usize);

    // Two stores: two relay processes with their own rotations.
    let first = PgOutbox::new(env.pool.clone());
    let second = PgOutbox::new(env.pool.clone());
    let held = first.claim(100).await.expect("first claim");
    let other = second.claim(all.len()).await.expect("second claim");
    let ids =
        |records: &[herald::PendingRecord]| -> Vec<i64> { records.iter().map(|r| r.id).collect() };
    let (held_ids, other_ids) = (ids(held.records()), ids(other.records()));
    assert_eq!(held_ids.len(), 100, "the first claim fills its batch");
    assert!(!other_ids.is_empty(), "the second claim finds other shards");

    let aggregates =
        |ids: &[i64]| -> HashSet<&str> { ids.iter().map(|id| all[id].as_str()).collect() };
    let shared: Vec<_> = aggregates(&held_ids)
        .intersection(&aggregates(&other_ids))
        .copied()
        .collect();
    assert!(
        shared.is_empty(),
        "aggregates in both open claims: {shared:?}"
    );

    // Each claim holds, of every aggregate it touches, the earliest rows.
    for claimed in [&held_ids, &other_ids] {
        let mut per_aggregate: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for id in claimed.iter() {
            per_aggregate.entry(all[id].as_str()).or_default().push(*id);
        }
        for (aggregate, mut got) in per_aggregate {
            got.sort_unstable();
            let expected: Vec<i64> = all
                .iter()
                .filter(|(_, key)| key.as_str() == aggregate)
                .map(|(id, _)| *id)
                .take(got.len())
                .collect();
            assert_eq!(got, expected, "{aggregate}: not a prefix");
        }
    }

    other.commit(&other_ids).await.expect("second mark");
    held.commit(&held_ids).await.expect("first mark");
    let rest = first.claim(all.len()).await.expect("the rest");
    let rest_ids = ids(rest.records());
    rest.commit(&rest_ids).await.expect("last mark");

    let mut every: Vec<i64> = [held_ids, other_ids, rest_ids].concat();
    let claimed = every.len();
    every.sort_unstable();
    every.dedup();
    assert_eq!(every.len(), claimed, "a row was claimed twice");
    assert_eq!(every, all.keys().copied().collect::<Vec<_>>());
    let status = herald_postgres::outbox::status(&env.pool)
        .await
        .expect("status");
    assert_eq!(status.backlog, 0);
}
