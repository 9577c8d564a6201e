//! Consumer offsets kept in PostgreSQL, in the handler's transaction
//! (issue #15): the inbox moves a record's partition beside its effects,
//! and the consumer starts each assigned partition at its stored offset.
//! A consumer SIGKILLed between its effects' commit and its Kafka commit
//! resumes exactly where its effects are (nothing applied twice, nothing
//! handled again), and partitions handed back and forth between members
//! keep every effect once, with no event-id inbox row at all.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::{Applied, HandlerError, OffsetStore, Position};
use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use herald_postgres::{Dedupe, Inbox};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

/// The record at `offset`, started when every record before `done_below`
/// was done.
fn at(topic: &str, partition: i32, offset: i64, done_below: i64) -> Position {
    Position {
        topic: Arc::from(topic),
        partition,
        offset,
        done_below: Some(done_below),
    }
}

/// Effects that write one row, or fail after writing it.
async fn write(
    conn: &mut sqlx::PgConnection,
    event_id: Uuid,
    fail: bool,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO effects (event_id, key, seq) VALUES ($1, 'k', 0)")
        .bind(event_id)
        .execute(&mut *conn)
        .await
        .map_err(herald_postgres::classify)?;
    if fail {
        return Err(HandlerError::transient("injected"));
    }
    Ok(())
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_that_keeps_offsets_applies_each_position_once() {
    let Some(env) = env(1).await else {
        return;
    };
    create_step_effects(&env.pool).await;
    let t = "orders";
    for (name, batched) in [("alone", false), ("batched", true)] {
        let inbox = if batched {
            Inbox::batched(env.pool.clone(), name, 64, Duration::from_millis(20))
        } else {
            Inbox::new(env.pool.clone(), name)
        }
        .dedupe(Dedupe::Offsets);
        let apply = async |position: Position, fail: bool| {
            let id = Uuid::new_v4();
            inbox
                .apply_at(id, position, async move |conn| write(conn, id, fail).await)
                .await
        };
        let stored = async || {
            let mut stored = inbox
                .next_offsets(t, &[0, 1])
                .await
                .expect("stored offsets");
            stored.sort_unstable();
            stored
        };
        // Each record in turn: (partition, offset, done below, answer).
        let expect = async |records: &[(i32, i64, i64, Applied)]| {
            for &(partition, offset, below, answer) in records {
                assert_eq!(
                    apply(at(t, partition, offset, below), false)
                        .await
                        .expect("applied"),
                    answer,
                    "{name}: partition {partition}, offset {offset}"
                );
            }
        };
        use Applied::{AlreadyProcessed, Now};
        // The same record again (another member of the group), and one
        // before the done offset: applied already, effects not run.
        expect(&[
            (0, 5, 5, Now),
            (0, 5, 5, AlreadyProcessed),
            (0, 3, 3, AlreadyProcessed),
        ])
        .await;
        // Failed effects record nothing of their record.
        assert!(apply(at(t, 0, 6, 5), true).await.is_err());
        assert_eq!(stored().await, [(0, 5)], "{name}");
        // Keys finish out of order: 9 before 8, while 7 is still running
        // (the done offset stays at 7).
        expect(&[
            (0, 6, 5, Now),
            (0, 9, 7, Now),
            (0, 8, 7, Now),
            (0, 9, 7, AlreadyProcessed),
            (0, 7, 7, Now),
            (1, 0, 0, Now),
        ])
        .await;
        assert_eq!(stored().await, [(0, 7), (1, 0)], "{name}");
        // A later record moves the done offset past what it says is done.
        expect(&[(0, 10, 10, Now)]).await;
        assert_eq!(stored().await, [(0, 10), (1, 0)], "{name}");
        expect(&[
            (0, 8, 10, AlreadyProcessed),
            (0, 9, 10, AlreadyProcessed),
            (0, 7, 7, AlreadyProcessed),
        ])
        .await;
        // Without the record's position the inbox cannot say: refused.
        let refused = inbox
            .apply(Uuid::new_v4(), async |_conn| Ok(()))
            .await
            .expect_err("no position");
        assert!(refused.to_string().contains("apply_at"), "{refused}");
    }
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM effects").await,
        14,
        "seven applied per inbox"
    );
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM herald_inbox").await,
        0,
        "no event-id rows"
    );

    // Both: an event published twice (at two offsets) is applied once, and
    // its second record is done all the same.
    let inbox = Inbox::batched(env.pool.clone(), "both", 64, Duration::from_millis(20))
        .dedupe(Dedupe::EventIdsAndOffsets);
    let id = Uuid::new_v4();
    let first = inbox.apply_at(id, at(t, 0, 10, 10), async move |conn| {
        write(conn, id, false).await
    });
    assert_eq!(first.await.expect("applied"), Applied::Now);
    let again = inbox.apply_at(id, at(t, 0, 11, 11), async move |conn| {
        write(conn, id, false).await
    });
    assert_eq!(again.await.expect("applied"), Applied::AlreadyProcessed);
    let again = inbox.apply_at(Uuid::new_v4(), at(t, 0, 11, 11), async |_conn| Ok(()));
    assert_eq!(
        again.await.expect("applied"),
        Applied::AlreadyProcessed,
        "offset 11 is done"
    );
    // In one batch: a failing event gives its inbox row back and records
    // nothing of its record; the others commit.
    let (good, bad) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, b) = tokio::join!(
        inbox.apply_at(good, at(t, 1, 0, 0), async move |conn| write(
            conn, good, false
        )
        .await),
        inbox.apply_at(bad, at(t, 1, 1, 0), async move |conn| write(
            conn, bad, true
        )
        .await),
    );
    assert_eq!(a.expect("applied"), Applied::Now);
    assert!(b.is_err());
    assert!(
        !inbox.contains(bad).await.expect("inbox"),
        "the failed event is not in the inbox"
    );
    let bad_again = inbox.apply_at(bad, at(t, 1, 1, 1), async move |conn| {
        write(conn, bad, false).await
    });
    assert_eq!(
        bad_again.await.expect("applied"),
        Applied::Now,
        "and its record is applied on retry"
    );
    assert_eq!(count(&env.pool, "SELECT count(*) FROM effects").await, 17);
}

/// Two members applying the same record at once (a rebalance's old and new
/// owner): both read it as not applied and run the effects, and the one
/// that records it second finds it recorded and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_applied_by_two_members_at_once_has_one_effect() {
    let Some(env) = env(1).await else {
        return;
    };
    create_step_effects(&env.pool).await;
    for batched in [false, true] {
        let group = format!("race-{batched}");
        let inbox = |_| {
            if batched {
                Inbox::batched(env.pool.clone(), group.clone(), 64, Duration::ZERO)
            } else {
                Inbox::new(env.pool.clone(), group.clone())
            }
            .dedupe(Dedupe::Offsets)
        };
        let (old, new) = (inbox(0), inbox(1));
        let both_inside = Arc::new(tokio::sync::Barrier::new(2));
        let apply = async |inbox: &Inbox| {
            let both_inside = Arc::clone(&both_inside);
            let id = Uuid::new_v4();
            inbox
                .apply_at(id, at("orders", 0, 42, 42), async move |conn| {
                    write(conn, id, false).await?;
                    both_inside.wait().await;
                    Ok(())
                })
                .await
        };
        let (a, b) = tokio::join!(apply(&old), apply(&new));
        let mut outcomes = [a, b];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert!(
            matches!(
                outcomes,
                [Ok(Applied::AlreadyProcessed) | Err(_), Ok(Applied::Now)]
            ),
            "batched {batched}: one applied, the other not: {outcomes:?}"
        );
    }
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM effects").await,
        2,
        "one effect per group"
    );
}

/// The key whose first event is poison in the hand-over test: dead-lettered,
/// and its later events parked behind it, in partitions whose other keys
/// go on.
const POISONED: &str = "key-7";

/// Records a consumer takes before it pauses fetching.
const MAX_IN_FLIGHT: usize = 32;

/// A consumer that keeps its offsets in the inbox: each event's effect is
/// one row of `effects`; `handled` counts the handler's calls. With
/// `poison`, the first event of [`POISONED`] fails for good.
fn consumer(
    env_topic: &str,
    brokers: &str,
    pool: &PgPool,
    group: &str,
    handled: Arc<AtomicU64>,
    poison: bool,
) -> Consumer {
    let inbox = Inbox::batched(pool.clone(), group, 64, Duration::ZERO).dedupe(Dedupe::Offsets);
    let router = Router::new().handle("kept", {
        let inbox = inbox.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let (inbox, handled) = (inbox.clone(), Arc::clone(&handled));
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                if poison && step.key == POISONED && step.seq == 0 {
                    return Err(HandlerError::permanent("poison"));
                }
                inbox
                    .apply_at(step.event_id, record.position(), async move |conn| {
                        write_step(conn, &step).await
                    })
                    .await
                    .map(|_| ())
            }
        }
    });
    let config = ConsumerConfig::new(brokers, group, [env_topic])
        .offsets_in(inbox)
        .concurrency(16)
        .max_in_flight(MAX_IN_FLIGHT)
        // The Kafka commit waits an hour: what the store has is all
        // there is until the consumer stops.
        .commit_interval(Duration::from_secs(3600));
    Consumer::new(config, router).expect("consumer")
}

/// Every event's effect is there once, and each key's in order; with
/// `poison`, none of [`POISONED`]'s (its first failed, the rest were
/// parked behind it).
async fn assert_each_effect_once_in_order(pool: &PgPool, events: &[TestEvent], poison: bool) {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT event_id, key, seq FROM effects ORDER BY id")
            .fetch_all(pool)
            .await
            .expect("effects");
    let mut per_event: BTreeMap<Uuid, usize> = BTreeMap::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, key, seq) in rows {
        *per_event.entry(id).or_default() += 1;
        per_key.entry(key).or_default().push(seq);
    }
    let twice = per_event.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "{twice} events were applied more than once");
    let missing = events
        .iter()
        .filter(|TestEvent::Step(s)| !(poison && s.key == POISONED))
        .filter(|TestEvent::Step(s)| !per_event.contains_key(&s.event_id))
        .count();
    assert_eq!(missing, 0, "{missing} events were never applied");
    assert!(
        !poison || !per_key.contains_key(POISONED),
        "the poisoned key's later events were parked, not applied"
    );
    for (key, seqs) in per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
}

const ENV_URL: &str = "HERALD_OFFSETS_CHILD_DATABASE_URL";
const ENV_TOPIC: &str = "HERALD_OFFSETS_CHILD_TOPIC";
const ENV_GROUP: &str = "HERALD_OFFSETS_CHILD_GROUP";

/// The child process: the consumer, until the test kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of offsets::a_consumer_killed_between_its_effects_and_its_kafka_commit_resumes_at_its_stored_offsets"]
async fn offsets_consumer_child() {
    let Ok(url) = std::env::var(ENV_URL) else {
        return;
    };
    let kafka = herald_test::kafka().expect("kafka");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("pool");
    let topic = std::env::var(ENV_TOPIC).expect("topic");
    let group = std::env::var(ENV_GROUP).expect("group");
    let consumer = consumer(
        &topic,
        kafka.brokers(),
        &pool,
        &group,
        Arc::default(),
        false,
    );
    consumer
        .run(std::future::pending())
        .await
        .expect("consumer");
}

fn spawn_child(env: &Env, group: &str) -> Child {
    spawn_child_test(
        "offsets::offsets_consumer_child",
        &[
            (ENV_URL, env.db.url()),
            (ENV_TOPIC, env.topic.name()),
            (ENV_GROUP, group),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_its_effects_and_its_kafka_commit_resumes_at_its_stored_offsets()
{
    let Some(env) = env(3).await else {
        return;
    };
    create_step_effects(&env.pool).await;
    let events = steps(40, 25);
    for result in publisher(&env.kafka)
        .publish_batch(env.topic.name(), &events)
        .await
    {
        result.expect("published");
    }
    let group = herald_test::unique_name("offsets-kill");

    // The child applies a share, then dies by SIGKILL mid-stream.
    let mut child = spawn_child(&env, &group);
    herald_test::poll_until(
        "the child to apply a share",
        Duration::from_secs(120),
        async || {
            let n = count(&env.pool, "SELECT count(*) FROM effects").await;
            if n >= 300 {
                Ok(())
            } else {
                Err(format!("{n} applied"))
            }
        },
    )
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let applied = count(&env.pool, "SELECT count(*) FROM effects").await;
    let committed = env
        .kafka
        .try_committed(&group, env.topic.name(), 3)
        .unwrap_or_default();
    assert!(
        committed.values().all(|o| *o <= 0),
        "the child committed nothing to Kafka: {committed:?}"
    );

    // The next member starts at the stored offsets: it handles exactly the
    // records whose effects are not there, none twice.
    let handled = Arc::new(AtomicU64::new(0));
    let next = consumer(
        env.topic.name(),
        env.kafka.brokers(),
        &env.pool,
        &group,
        Arc::clone(&handled),
        false,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(next.run(stop.clone().cancelled_owned()));
    let total = events.len() as i64;
    herald_test::poll_until("every effect", Duration::from_secs(120), async || {
        let n = count(&env.pool, "SELECT count(*) FROM effects").await;
        if n >= total {
            Ok(())
        } else {
            Err(format!("{n} of {total} applied"))
        }
    })
    .await;
    stop.cancel();
    task.await.expect("join").expect("consumer");
    assert_each_effect_once_in_order(&env.pool, &events, false).await;
    // Replayed: records the first applied above its partition's done
    // offset (keys finish out of order), skipped by the store: about what
    // it had in flight (16 to 33 in three local runs, with 303 to 359
    // applied). Without the stored offsets it replays all it applied.
    let handled = handled.load(Ordering::SeqCst);
    let replayed = handled - (total - applied) as u64;
    eprintln!("the second member replayed {replayed} records ({applied} applied before the kill)");
    assert!(
        replayed < applied as u64 / 2,
        "the second member started where the first's effects are: it handled {handled} \
         records, {replayed} of them applied by the first ({applied} applied before the kill)"
    );
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM herald_inbox").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_handed_back_and_forth_keep_each_effect_once_from_stored_offsets() {
    let Some(env) = env(6).await else {
        return;
    };
    create_step_effects(&env.pool).await;
    let events = steps(60, 40);
    let publisher = publisher(&env.kafka);
    let waves: Vec<&[TestEvent]> = events.chunks(events.len() / 4).collect();
    let group = herald_test::unique_name("offsets-churn");
    let total = events
        .iter()
        .filter(|TestEvent::Step(s)| s.key != POISONED)
        .count() as i64;

    let stop = CancellationToken::new();
    let first = consumer(
        env.topic.name(),
        env.kafka.brokers(),
        &env.pool,
        &group,
        Arc::default(),
        true,
    );
    let stats = first.stats();
    let first = tokio::spawn(first.run(stop.clone().cancelled_owned()));
    for result in publisher.publish_batch(env.topic.name(), waves[0]).await {
        result.expect("published");
    }
    // A second member joins and leaves three times, each time while a wave
    // is being applied: partitions go to it and come back.
    for wave in &waves[1..] {
        let leave = CancellationToken::new();
        let second = consumer(
            env.topic.name(),
            env.kafka.brokers(),
            &env.pool,
            &group,
            Arc::default(),
            true,
        );
        let second_stats = second.stats();
        let second = tokio::spawn(second.run(leave.clone().cancelled_owned()));
        herald_test::wait_until(
            "the second member to get partitions",
            Duration::from_secs(60),
            || second_stats.assigned_partitions() > 0,
        )
        .await;
        for result in publisher.publish_batch(env.topic.name(), wave).await {
            result.expect("published");
        }
        herald_test::poll_until(
            "the second member to apply some",
            Duration::from_secs(60),
            async || {
                let handled = second_stats.handled();
                if handled > 0 {
                    Ok(())
                } else {
                    Err("none yet".to_owned())
                }
            },
        )
        .await;
        leave.cancel();
        second.await.expect("join").expect("second member");
        herald_test::wait_until("the partitions given back", Duration::from_secs(60), || {
            stats.assigned_partitions() == 6
        })
        .await;
    }
    herald_test::poll_until("every effect", Duration::from_secs(120), async || {
        let n = count(&env.pool, "SELECT count(*) FROM effects").await;
        if n >= total {
            Ok(())
        } else {
            Err(format!("{n} of {total} applied"))
        }
    })
    .await;
    stop.cancel();
    first.await.expect("join").expect("first member");
    assert_each_effect_once_in_order(&env.pool, &events, true).await;
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM herald_inbox").await,
        0
    );
    // The store has a row per partition, its done offset and the offsets
    // applied above it within the partition. (Kafka's commit is not
    // checked: the members stop once every effect is there, possibly
    // before they went through records the store skips.)
    let stored: Vec<(i32, i64, Vec<i64>)> =
        sqlx::query_as("SELECT partition, next_offset, done FROM herald_consumer_offsets")
            .fetch_all(&env.pool)
            .await
            .expect("stored offsets");
    let end = env.kafka.end_offsets(env.topic.name(), 6);
    assert_eq!(stored.len(), 6, "a row per partition: {stored:?}");
    for (partition, next, done) in &stored {
        assert!(
            next <= &end[partition] && done.iter().all(|o| next <= o && o < &end[partition]),
            "partition {partition}: done below {next}, then {done:?}; its end is {}",
            end[partition]
        );
    }
}
