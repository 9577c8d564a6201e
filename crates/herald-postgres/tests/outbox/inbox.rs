//! Guarantee 2: the same event delivered twice — one after the other, or to
//! two consumers of the group at once — has one effect.

use std::sync::Arc;
use std::time::Duration;

use herald::HandlerError;
use herald_postgres::{Applied, Inbox};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::support::*;

async fn counter_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE effects (event_id UUID NOT NULL, applied_by TEXT NOT NULL)")
        .execute(pool)
        .await
        .expect("effects table");
}

/// Writes `event_id`'s effect row, applied by `by`.
async fn write_effect(
    conn: &mut PgConnection,
    event_id: Uuid,
    by: &str,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO effects VALUES ($1, $2)")
        .bind(event_id)
        .bind(by)
        .execute(conn)
        .await
        .map_err(herald_postgres::classify)?;
    Ok(())
}

/// A batched inbox that waits long enough for concurrent calls to share
/// one batch.
fn one_batch_inbox(pool: &PgPool) -> Arc<Inbox> {
    Arc::new(Inbox::batched(
        pool.clone(),
        "projection",
        16,
        Duration::from_millis(200),
    ))
}

async fn apply(inbox: &Inbox, event_id: Uuid, by: &'static str) -> Result<Applied, HandlerError> {
    inbox
        .apply(event_id, async move |conn| {
            write_effect(conn, event_id, by).await?;
            // Hold the transaction open a little so that concurrent
            // deliveries really overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        })
        .await
}

async fn effects_of(pool: &PgPool, event_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_has_one_effect() {
    let Some(env) = env(1).await else {
        return;
    };
    counter_table(&env.pool).await;
    let inbox = Inbox::new(env.pool.clone(), "projection");
    let event_id = Uuid::new_v4();
    assert_eq!(
        apply(&inbox, event_id, "first").await.expect("first"),
        Applied::Now
    );
    assert_eq!(
        apply(&inbox, event_id, "again").await.expect("again"),
        Applied::AlreadyProcessed
    );
    assert_eq!(effects_of(&env.pool, event_id).await, 1);
    assert!(inbox.contains(event_id).await.expect("contains"));

    // Another group applies it once too.
    let other = Inbox::new(env.pool.clone(), "notifications");
    assert_eq!(
        apply(&other, event_id, "other").await.expect("other"),
        Applied::Now
    );
    assert_eq!(effects_of(&env.pool, event_id).await, 2);

    // A failed effect rolls back the inbox row too: the retry applies it.
    let failing = Uuid::new_v4();
    let err = inbox
        .apply(failing, async |_conn| Err(HandlerError::transient("boom")))
        .await
        .expect_err("fails");
    assert!(err.is_transient());
    assert!(!inbox.contains(failing).await.expect("contains"));
    assert_eq!(
        apply(&inbox, failing, "retry").await.expect("retry"),
        Applied::Now
    );

    // Retention: everything older than zero seconds goes.
    let purged = herald_postgres::inbox::purge_processed(&env.pool, Duration::ZERO, 1000)
        .await
        .expect("purge");
    assert_eq!(purged, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_to_two_consumers_have_one_effect() {
    let Some(env) = env(1).await else {
        return;
    };
    counter_table(&env.pool).await;
    // Two consumers of one group: one unbatched, one batched.
    let a = Arc::new(Inbox::new(env.pool.clone(), "projection"));
    let b = Arc::new(Inbox::batched(
        env.pool.clone(),
        "projection",
        16,
        Duration::from_millis(5),
    ));
    let events: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    let mut tasks = Vec::new();
    for id in &events {
        for (inbox, by) in [(Arc::clone(&a), "a"), (Arc::clone(&b), "b")] {
            let id = *id;
            tasks.push(tokio::spawn(async move {
                loop {
                    match apply(&inbox, id, by).await {
                        Ok(applied) => return applied,
                        // Deadlocks between the two transactions are possible
                        // and transient: the runtime would retry, so do we.
                        Err(e) if e.is_transient() => continue,
                        Err(e) => panic!("permanent failure: {e}"),
                    }
                }
            }));
        }
    }
    let mut now = 0;
    for t in tasks {
        if t.await.expect("task") == Applied::Now {
            now += 1;
        }
    }
    assert_eq!(
        now,
        events.len(),
        "exactly one delivery of each event applied"
    );
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(total, events.len() as i64, "one effect per event");
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM effects")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(distinct, events.len() as i64);
}

/// Issue #20, scenario 6: effects that panic in a batched inbox fail that
/// event alone (permanent, nothing of it committed); the events batched
/// with it and every later event still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_batched_effects_fails_that_event_and_not_the_batcher() {
    let Some(env) = env(1).await else {
        return;
    };
    counter_table(&env.pool).await;
    let inbox = one_batch_inbox(&env.pool);
    let (before, poisoned, after) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let panicking = {
        let inbox = Arc::clone(&inbox);
        tokio::spawn(async move {
            inbox
                .apply(poisoned, async move |conn| {
                    write_effect(conn, poisoned, "poisoned").await?;
                    panic!("a bug in the effects");
                })
                .await
        })
    };
    let (first, second) = tokio::join!(
        apply(&inbox, before, "before"),
        apply(&inbox, after, "after")
    );
    assert_eq!(first.expect("batched with the panic"), Applied::Now);
    assert_eq!(second.expect("batched with the panic"), Applied::Now);
    let error = panicking
        .await
        .expect("the caller's task does not panic")
        .expect_err("the panicking event fails");
    assert!(!error.is_transient(), "a panic is permanent: {error}");
    assert!(
        error.to_string().contains("a bug in the effects"),
        "{error}"
    );
    assert_eq!(effects_of(&env.pool, poisoned).await, 0, "rolled back");
    assert!(!inbox.contains(poisoned).await.expect("contains"));

    // The batcher is still there for later events.
    let later = Uuid::new_v4();
    assert_eq!(
        apply(&inbox, later, "later").await.expect("later event"),
        Applied::Now
    );
    for id in [before, after, later] {
        assert_eq!(effects_of(&env.pool, id).await, 1);
    }
}

/// A batched inbox's batch holding an event whose effects fail and the same
/// event twice: the failing event's effects and claim roll back (savepoint),
/// the duplicate copy is told to come back (transient) and then finds the
/// event applied, the rest commits. A failing event alone in its batch
/// (no savepoint) rolls back the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_its_good_events_and_rolls_back_a_failing_one() {
    let Some(env) = env(1).await else {
        return;
    };
    counter_table(&env.pool).await;
    let inbox = one_batch_inbox(&env.pool);
    let (good, twice, failing) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let fail = |inbox: Arc<Inbox>| async move {
        inbox
            .apply(failing, async move |conn| {
                write_effect(conn, failing, "failing").await?;
                Err(HandlerError::permanent("the effect is refused"))
            })
            .await
    };
    let (good_result, first, second, failed) = tokio::join!(
        apply(&inbox, good, "good"),
        apply(&inbox, twice, "first copy"),
        apply(&inbox, twice, "second copy"),
        fail(Arc::clone(&inbox)),
    );
    assert_eq!(good_result.expect("good event"), Applied::Now);
    let copies = [first, second];
    assert_eq!(
        copies
            .iter()
            .filter(|r| matches!(r, Ok(Applied::Now)))
            .count(),
        1,
        "one copy applied: {copies:?}"
    );
    let other = copies
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("the other copy is told to come back");
    assert!(other.is_transient(), "{other}");
    assert_eq!(
        apply(&inbox, twice, "again").await.expect("retried copy"),
        Applied::AlreadyProcessed
    );
    let error = failed.expect_err("the failing event fails");
    assert!(
        error.to_string().contains("the effect is refused"),
        "{error}"
    );
    assert!(!error.is_transient());
    assert_eq!(effects_of(&env.pool, failing).await, 0, "rolled back");
    assert!(!inbox.contains(failing).await.expect("contains"));
    for id in [good, twice] {
        assert_eq!(effects_of(&env.pool, id).await, 1);
        assert!(inbox.contains(id).await.expect("contains"));
    }

    // Alone in its batch: no savepoint, the transaction rolls back.
    fail(Arc::clone(&inbox)).await.expect_err("fails again");
    assert_eq!(effects_of(&env.pool, failing).await, 0, "rolled back");
    assert!(!inbox.contains(failing).await.expect("contains"));
    assert_eq!(
        apply(&inbox, failing, "fixed")
            .await
            .expect("applied at last"),
        Applied::Now
    );
    assert_eq!(effects_of(&env.pool, failing).await, 1);
}
