//! Both outbox relays on a replicated cluster of the test's own (three
//! nodes, RF 3, `min.insync.replicas` 2; issue #18) when a partition
//! leader's broker dies with SIGKILL in the middle of a relay load.
//!
//! Two outboxes (databases of their own on the shared PostgreSQL) fill
//! with committed transactions of events of 100 aggregates while an
//! at-least-once [`Relay`] and an exactly-once relay publish them, each to
//! its own topic on the cluster. Once both have published a share, the
//! node that leads partitions of both topics is killed; the writers go on
//! for a hundred transactions each, the relays until both outboxes are
//! drained. Then each topic is read with `read_committed` and judged
//! against its outbox (committed = the outbox's rows in id order,
//! [`herald_test::invariants::Check`]):
//!
//! - nothing committed is lost, and each aggregate's events are on the
//!   topic in their committed order (first sightings), for both relays;
//! - the exactly-once relay publishes each event once;
//! - the at-least-once relay publishes an event again only after a
//!   delivery or a mark it did not see succeed (its documented cause of a
//!   duplicate besides its own crash, which does not happen here): with no
//!   failed delivery and no store failure in its counters, no duplicate
//!   either. Idempotence and `acks=all` carry its in-flight records to the
//!   new leader, so a broker's death alone repeats nothing.
//!
//! The kill must fall inside the load: both relays published before it and
//! after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_kafka::{PublisherConfig, Relay, RelayConfig, TransactionalRelay};
use herald_postgres::PgOutbox;
use herald_test::cluster::PrivateKafkaCluster;
use herald_test::faults::Timeline;
use herald_test::invariants::{Check, Report};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const PARTITIONS: i32 = 3;
const AGGREGATES: usize = 100;
const PER_TRANSACTION: usize = 5;
/// Events each relay publishes before the kill.
const BEFORE_KILL: i64 = 300;
/// Transactions each writer commits once the node is dead.
const AFTER_KILL: usize = 100;
/// A bound on a writer whose kill never comes (the wait for it fails).
const AT_MOST: usize = 4_000;

/// Commits outbox transactions of `PER_TRANSACTION` events to `topic`,
/// each aggregate's steps numbered in order, a few dozen a second, until
/// `AFTER_KILL` of them are committed after `killed` is set: the load
/// goes on through the failover, whatever pace the relays keep.
async fn write(pool: PgPool, topic: String, killed: Arc<AtomicBool>) {
    let mut next = vec![0u64; AGGREGATES];
    let mut after_kill = 0;
    for t in 0..AT_MOST {
        let events: Vec<TestEvent> = (0..PER_TRANSACTION)
            .map(|i| {
                let a = (t * PER_TRANSACTION + i) % AGGREGATES;
                next[a] += 1;
                step(&format!("agg-{a}"), next[a])
            })
            .collect();
        enqueue_committed_all(&pool, &topic, &events).await;
        if killed.load(Ordering::SeqCst) {
            after_kill += 1;
            if after_kill == AFTER_KILL {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status(pool: &PgPool) -> herald_postgres::OutboxStatus {
    herald_postgres::outbox::status(pool).await.expect("status")
}

/// What the outbox committed: its rows in id order, each aggregate's in
/// the order they were created.
async fn committed(pool: &PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT event_id, aggregate_id FROM herald_outbox ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("outbox rows")
}

/// One outbox and the topic its relay publishes to.
struct Outbox {
    env: Env,
    /// Until [`Outbox::drained`] waits for it.
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Outbox {
    async fn start(
        cluster: &PrivateKafkaCluster,
        postgres: &herald_test::Postgres,
        killed: &Arc<AtomicBool>,
    ) -> Self {
        let kafka = cluster.kafka();
        let db = postgres.database().await;
        let pool = db.pool().await;
        herald_postgres::migrate(&pool).await.expect("migrate");
        let topic = kafka.topic("cluster-relay", PARTITIONS).await;
        let writer = tokio::spawn(write(
            pool.clone(),
            topic.name().to_owned(),
            Arc::clone(killed),
        ));
        Self {
            env: Env {
                kafka,
                db,
                pool,
                topic,
            },
            writer: Some(writer),
        }
    }

    fn leaders(&self, cluster: &PrivateKafkaCluster) -> Vec<i32> {
        (0..PARTITIONS)
            .map(|p| cluster.leader(self.env.topic.name(), p))
            .collect()
    }

    /// Waits for the writer and then for the relay to drain the outbox.
    async fn drained(&mut self, what: &str, context: &str) {
        if let Some(writer) = self.writer.take() {
            writer.await.expect("writer");
        }
        outbox_reaches(
            &self.env.pool,
            &format!("the {what} outbox drained\n{context}\n"),
            Duration::from_secs(120),
            |s| s.backlog == 0,
        )
        .await;
    }

    /// Reads the topic and judges it against the outbox.
    async fn judge(&self) -> Report {
        let check = Check::new().committed(committed(&self.env.pool).await);
        let (kafka, topic) = (self.env.kafka.clone(), self.env.topic.name().to_owned());
        tokio::task::spawn_blocking(move || check.read(&kafka, &topic, PARTITIONS, None))
            .await
            .expect("reader")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_killed_mid_load_loses_and_reorders_nothing_in_either_relay() {
    let (Some(_), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let timeline = Timeline::new();
    let mut cluster = tokio::task::spawn_blocking(PrivateKafkaCluster::start)
        .await
        .expect("the cluster");
    timeline.note(format!("cluster up at {}", cluster.brokers()));
    let brokers = cluster.brokers();

    let killed = Arc::new(AtomicBool::new(false));
    let mut at_least_once = Outbox::start(&cluster, &postgres, &killed).await;
    let alo = relay(&at_least_once.env, at_least_once.env.pool.clone());
    let alo_stats = alo.stats();
    let mut exactly_once = Outbox::start(&cluster, &postgres, &killed).await;
    let identity = Exactly::new(&exactly_once.env.kafka).await;
    // A worker per slot and larger batches than `Exactly::relay`'s: on
    // three replicas a transaction takes a while, and the relay must keep
    // up with the writer.
    let eo = TransactionalRelay::new(
        PgOutbox::new(exactly_once.env.pool.clone()),
        &PublisherConfig::new(&brokers, "/outbox-tests"),
        RelayConfig {
            batch_size: 200,
            poll_interval: Duration::from_millis(100),
            workers: usize::from(herald_postgres::RELAY_SLOTS),
            max_backoff: Duration::from_secs(1),
        },
        identity.config(),
    )
    .await
    .expect("exactly-once relay");
    let eo_stats = eo.stats();
    let stop = CancellationToken::new();
    let relays = [
        tokio::spawn(Relay::run(alo, stop.clone().cancelled_owned())),
        tokio::spawn(eo.run(stop.clone().cancelled_owned())),
    ];

    herald_test::poll_until(
        "both relays to publish a share",
        Duration::from_secs(120),
        async || {
            let (a, e) = (
                status(&at_least_once.env.pool).await,
                status(&exactly_once.env.pool).await,
            );
            if a.published_retained >= BEFORE_KILL && e.published_retained >= BEFORE_KILL {
                Ok(())
            } else {
                Err(format!("at least once {a:?}, exactly once {e:?}"))
            }
        },
    )
    .await;
    // The node to kill leads partitions of both topics (with three of each
    // over three nodes, every node usually does).
    let (alo_leaders, eo_leaders) = tokio::task::block_in_place(|| {
        (
            at_least_once.leaders(&cluster),
            exactly_once.leaders(&cluster),
        )
    });
    let victim = alo_leaders
        .iter()
        .copied()
        .find(|n| eo_leaders.contains(n))
        .unwrap_or(alo_leaders[0]);
    let before = [
        status(&at_least_once.env.pool).await.published_retained,
        status(&exactly_once.env.pool).await.published_retained,
    ];
    tokio::task::block_in_place(|| cluster.kill(victim));
    killed.store(true, Ordering::SeqCst);
    timeline.note(format!(
        "[SIGKILL] node {victim}; leaders at least once {alo_leaders:?}, exactly once \
         {eo_leaders:?}; published before: at least once {}, exactly once {}",
        before[0], before[1]
    ));

    let survivor = cluster.node_other_than(&[victim]);
    let context = || {
        format!(
            "{}\nat least once: {alo_stats:?}\nexactly once: {eo_stats:?}\nthe log of node {survivor} (last lines):\n{}",
            timeline.text(),
            cluster.log_tail(survivor, 40)
        )
    };
    at_least_once.drained("at least once", &context()).await;
    exactly_once.drained("exactly once", &context()).await;
    timeline.note("both outboxes drained");
    stop.cancel();
    for relay in relays {
        relay.await.expect("relay");
    }

    // Both relays published before the kill, and (the writers went on)
    // after it.
    let total = [
        status(&at_least_once.env.pool).await.published_retained,
        status(&exactly_once.env.pool).await.published_retained,
    ];
    timeline.note(format!(
        "published in all: at least once {}, exactly once {}",
        total[0], total[1]
    ));
    assert!(
        before.iter().zip(&total).all(|(&b, &t)| 0 < b && b < t),
        "the kill fell inside both loads: published before it {before:?}, in all {total:?}\n{}",
        context()
    );

    let eo_report = exactly_once.judge().await;
    eprintln!(
        "exactly once: {eo_report}\n{} published, {} transactions aborted, {} producers fenced in",
        eo_stats.published(),
        eo_stats.aborted(),
        eo_stats.fences()
    );
    eo_report.assert_clean(&context());
    assert_eq!(eo_report.undecodable, 0);
    assert_eq!(
        eo_report.consumed as i64,
        total[1],
        "each event once\n{}",
        context()
    );

    let alo_report = at_least_once.judge().await;
    eprintln!(
        "at least once: {alo_report}\n{} published, {} failed deliveries, {} store failures",
        alo_stats.published(),
        alo_stats.publish_failures(),
        alo_stats.store_failures()
    );
    assert!(
        alo_report.lost.is_empty() && alo_report.misordered.is_empty(),
        "at least once: lost or misordered events\n{alo_report}\n{}",
        context()
    );
    assert_eq!(alo_report.undecodable, 0);
    let unseen_success = alo_stats.publish_failures() + alo_stats.store_failures();
    if unseen_success == 0 {
        assert!(
            alo_report.duplicated_on_topic.is_empty(),
            "at least once: duplicates with every delivery and mark seen to succeed\n{alo_report}\n{}",
            context()
        );
    } else {
        eprintln!(
            "at least once: {unseen_success} deliveries or marks failed; {} events published again",
            alo_report.duplicated_on_topic.len()
        );
    }
}
