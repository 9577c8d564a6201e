//! The library runtime put through the fault harness (issue #20): an inbox
//! consumer of 5,000 events (the batched inbox, as the orders service runs
//! it: the faults hit events that share transactions with others), its handler made to hang past the handler
//! timeout, fail transiently, panic and fail permanently for a few keys
//! (each fault inside the handler's database transaction, after its write),
//! while ghost members join and leave the group three times under
//! saturation (more active keys than the consumer's concurrency), so
//! partitions are taken away and given back to the same member. The events
//! come in four waves, one published while each ghost holds its partitions,
//! so what is given back always has records waiting. The
//! invariant checker then reads the topic and its DLQ `read_committed` and
//! the effects table: nothing lost, no effect twice, every key in order,
//! and exactly the poisoned keys dead-lettered (their first event) and
//! parked (the rest).

use std::collections::BTreeMap;
use std::time::Duration;

use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use herald_postgres::Inbox;
use herald_test::churn::GhostMember;
use herald_test::faults::Schedule;
use herald_test::handler_faults::HandlerFaults;
use herald_test::invariants::Check;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const KEYS: usize = 100;
const PER_KEY: u64 = 50;
const PARTITIONS: i32 = 6;
/// Below the number of keys that have records waiting, so a member that
/// gets partitions back has more active keys than it runs at once.
const CONCURRENCY: usize = 8;
const HANDLER_TIMEOUT: Duration = Duration::from_secs(2);
/// The keys whose first event is poison: dead-lettered, the rest parked.
const POISONED: [&str; 2] = ["key-13", "key-21"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_consumer_survives_handler_faults_and_group_churn_exactly_once() {
    let Some(env) = env(PARTITIONS).await else {
        return;
    };
    create_step_effects(&env.pool).await;
    let events = steps(KEYS, PER_KEY);
    let publisher = publisher(&env.kafka);
    // Four waves, each every key's next steps (so each key stays in order):
    // the first now, one more while each ghost holds partitions, so the
    // partitions given back always have records waiting.
    let waves: Vec<&[TestEvent]> = events.chunks(events.len() / 4).collect();
    let publish = async |wave: &[TestEvent]| {
        for result in publisher.publish_batch(env.topic.name(), wave).await {
            result.expect("published");
        }
    };
    publish(waves[0]).await;

    let mut schedule = Schedule::from_env();
    let faults = HandlerFaults::new()
        .hang("key-3", Duration::from_secs(3600), 1)
        .hang("key-7", Duration::from_secs(3600), 1)
        .fail_transiently("key-9", 2)
        .panic(POISONED[0], 1)
        .fail_permanently(POISONED[1], 1)
        .on_timeline(schedule.timeline().clone());
    let inbox = Inbox::batched(env.pool.clone(), "harnessed", 64, Duration::ZERO);
    let router = Router::new().handle("harnessed", {
        let faults = faults.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let (inbox, faults) = (inbox.clone(), faults.clone());
            async move {
                inbox
                    .apply(record.envelope.event_id, async move |conn| {
                        write_step(conn, &step).await?;
                        // After the write: a cut-off or failed call must
                        // leave neither the effect nor the inbox row.
                        faults.inject(&step.key).await
                    })
                    .await
                    .map(|_| ())
            }
        }
    });
    let group = herald_test::unique_name("harness");
    let config = ConsumerConfig::new(env.kafka.brokers(), &group, [env.topic.name()])
        .concurrency(CONCURRENCY)
        .handler_timeout(HANDLER_TIMEOUT)
        .retry(herald::RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            ..herald::RetryPolicy::default()
        });
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone().cancelled_owned()));

    let applied = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&env.pool)
            .await
            .expect("count")
    };
    herald_test::poll_until(
        "a first share handled",
        Duration::from_secs(120),
        async || {
            let n = applied().await;
            if n >= 300 {
                Ok(())
            } else {
                Err(format!("{n} applied"))
            }
        },
    )
    .await;
    // Churn under saturation: a ghost takes partitions away, holds them,
    // and gives them back, three times.
    for (round, wave) in (1..).zip(&waves[1..]) {
        schedule.step("ghost member joins", &format!("round {round}"));
        let ghost = GhostMember::join(env.kafka.config(), &group, &[env.topic.name()]);
        ghost.wait_assigned(Duration::from_secs(60)).await;
        let hold = schedule.between(Duration::from_millis(200), Duration::from_millis(1500));
        schedule.step(
            "ghost member holds",
            &format!("{} partitions for {hold:?}", ghost.assigned()),
        );
        publish(wave).await;
        tokio::time::sleep(hold).await;
        schedule.step("ghost member leaves", "");
        tokio::task::spawn_blocking(move || ghost.leave())
            .await
            .expect("ghost left");
        // Given back: the member holds every partition again before the
        // next ghost comes (else the coordinator may hand the leaver's
        // partitions straight to the next one).
        herald_test::wait_until("the partitions given back", Duration::from_secs(60), || {
            stats.assigned_partitions() == PARTITIONS as u64
        })
        .await;
        schedule.step("partitions given back", "");
    }

    let expected_effects = (KEYS - POISONED.len()) as i64 * PER_KEY as i64;
    let end = env.kafka.end_offsets(env.topic.name(), PARTITIONS);
    herald_test::poll_until(
        "every record handled and committed",
        Duration::from_secs(300),
        async || {
            let n = applied().await;
            let committed = env
                .kafka
                .try_committed(&group, env.topic.name(), PARTITIONS);
            if n >= expected_effects && committed.as_ref() == Ok(&end) {
                Ok(())
            } else {
                Err(format!(
                    "{n} of {expected_effects} applied; committed {committed:?}, end {end:?}\n{}",
                    schedule.report()
                ))
            }
        },
    )
    .await;
    stop.cancel();
    task.await.expect("task").expect("consumer ran");
    let report_context = schedule.report();

    // The checker: the topic and its DLQ read_committed, and the effects.
    let committed: Vec<(Uuid, String)> = events
        .iter()
        .map(|TestEvent::Step(s)| (s.event_id, s.key.clone()))
        .collect();
    let counts: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, count(*) FROM effects GROUP BY event_id")
            .fetch_all(&env.pool)
            .await
            .expect("effects");
    let dlq = format!("{}.dlq", env.topic.name());
    let report = Check::new()
        .committed(committed)
        .effects(counts.into_iter().map(|(id, n)| (id, n as u64)))
        .read(&env.kafka, env.topic.name(), PARTITIONS, Some(&dlq));
    report.assert_clean(&report_context);
    assert_eq!(report.committed, events.len());

    // Each key's effects in its order, once each.
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM effects ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("effects");
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, seq) in rows {
        by_key.entry(key).or_default().push(seq);
    }
    assert_eq!(by_key.len(), KEYS - POISONED.len(), "{report_context}");
    for (key, seqs) in &by_key {
        assert!(!POISONED.contains(&key.as_str()), "{key} was applied");
        assert_eq!(
            *seqs,
            (0..PER_KEY as i64).collect::<Vec<_>>(),
            "{key}: applied once each, in order\n{report_context}"
        );
    }

    // Exactly the poisoned keys are dead-lettered: their first event with
    // its error class, the rest parked behind it.
    let seq_of: BTreeMap<Uuid, (String, u64)> = events
        .iter()
        .map(|TestEvent::Step(s)| (s.event_id, (s.key.clone(), s.seq)))
        .collect();
    let mut letters: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for letter in &report.dead_letters {
        let id = letter.event_id.expect("a dead letter names its event");
        let (key, seq) = seq_of[&id].clone();
        letters
            .entry(key)
            .or_default()
            .push((seq, letter.error_class.clone().unwrap_or_default()));
    }
    assert_eq!(
        letters.keys().map(String::as_str).collect::<Vec<_>>(),
        POISONED.to_vec(),
        "dead letters only of the poisoned keys\n{report}"
    );
    for (key, mut seqs) in letters {
        seqs.sort();
        assert_eq!(
            seqs.len(),
            PER_KEY as usize,
            "{key}: every event dead-lettered once"
        );
        assert_eq!(
            seqs[0],
            (0, "permanent".to_owned()),
            "{key}: the poison first"
        );
        assert!(
            seqs[1..].iter().all(|(_, class)| class == "parked"),
            "{key}: the rest parked behind it: {seqs:?}"
        );
    }

    assert!(
        faults.all_fired(),
        "every fault fired: {:?}",
        faults.fired()
    );
    assert!(
        stats.handler_timeouts() >= 2,
        "the two hangs were cut off by the handler timeout"
    );
    assert!(stats.retried() >= 4, "the hangs and key-9 were retried");
    assert!(
        stats.assignments() >= 4,
        "the first assignment, then the partitions given back three times: {} assignments, {} rebalances",
        stats.assignments(),
        stats.rebalances(),
    );
    eprintln!(
        "judged: {} events, {} applied once each in key order, {} dead letters ({} keys parked); \
         handler timeouts {}, retries {}, assignments {}\n{report_context}",
        report.committed,
        expected_effects,
        report.dead_letters.len(),
        POISONED.len(),
        stats.handler_timeouts(),
        stats.retried(),
        stats.assignments(),
    );
}
