//! Late commits are never skipped or reordered: a transaction that enqueued
//! first but commits last is still published, and an aggregate's later event
//! cannot overtake it; rollbacks leave gaps that lose nothing; an idle open
//! transaction elsewhere does not hold the relay back.

use std::time::Duration;

use herald_postgres::StoreError;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_published_and_nothing_is_skipped() {
    let Some(env) = env(1).await else {
        return;
    };
    let topic = env.topic.name();
    let relay = relay(&env, env.pool.clone());

    // T1 enqueues first (taking the lower id) and stays open.
    let mut t1 = env.pool.begin().await.expect("t1");
    herald_postgres::outbox::enqueue(&mut t1, &record(topic, &step("shared", 0)))
        .await
        .expect("t1 enqueue");
    // A rolled-back transaction leaves a gap in the ids.
    let mut gap = env.pool.begin().await.expect("gap");
    herald_postgres::outbox::enqueue(&mut gap, &record(topic, &step("gap", 0)))
        .await
        .expect("gap enqueue");
    gap.rollback().await.expect("rollback");
    // T2 enqueues after T1 and commits first; the relay runs.
    enqueue_committed(&env.pool, topic, &step("other", 0)).await;
    assert_eq!(
        drain_all(&relay, &env.pool).await,
        1,
        "T2 is published at once"
    );

    // A writer of T1's aggregate that does not wait for T1 cannot slip in
    // front of it: it is refused with a transient conflict once T1 commits.
    let racer = {
        let pool = env.pool.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("racer");
            let result =
                herald_postgres::outbox::enqueue(&mut tx, &record(&topic, &step("shared", 99)))
                    .await;
            if result.is_ok() {
                tx.commit().await.expect("racer commit");
            }
            result
        })
    };
    // Wait until the racer blocks on T1's uncommitted row.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the racer never blocked on T1"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t1.commit().await.expect("t1 commit");
    let raced = racer.await.expect("racer task");
    assert!(
        matches!(&raced, Err(e @ StoreError::AggregateConflict { .. }) if e.is_transient()),
        "{raced:?}"
    );

    enqueue_committed(&env.pool, topic, &step("shared", 1)).await;
    assert_eq!(
        drain_all(&relay, &env.pool).await,
        2,
        "T1's late commit and what followed"
    );

    // An idle open transaction elsewhere (holding a transaction id) does not
    // delay unrelated events.
    let mut idle = env.pool.begin().await.expect("idle");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *idle)
        .await
        .expect("xid");
    enqueue_committed(&env.pool, topic, &step("shared", 2)).await;
    assert_eq!(
        relay.drain().await.expect("drain"),
        1,
        "not held back by the idle transaction"
    );
    idle.rollback().await.expect("end idle");

    let reads = read_to_end(&env.kafka, topic, 1);
    let seqs = sequences(&reads);
    assert_eq!(
        seqs["shared"],
        vec![0, 1, 2],
        "T1's event first, none skipped"
    );
    assert_eq!(seqs["other"], vec![0]);
    assert!(!seqs.contains_key("gap"), "rolled back: never published");
}
