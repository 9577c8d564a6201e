//! Shared set-up: a migrated fresh database, a topic, a relay, and a reader
//! that reads a topic to its end.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use herald_kafka::{
    ExactlyOnceConfig, FaultHook, Publisher, PublisherConfig, Relay, RelayConfig,
    TransactionalRelay,
};
use herald_postgres::{OutboxRecord, PgOutbox};
use rdkafka::message::Headers;
use rdkafka::Message;
use sqlx::PgPool;
use uuid::Uuid;

pub use herald_test::events::{step, steps, TestEvent};

pub fn record(topic: &str, event: &TestEvent) -> OutboxRecord {
    OutboxRecord::new(topic, event, "/outbox-tests", None).expect("encode")
}

pub struct Env {
    pub kafka: herald_test::Kafka,
    pub db: herald_test::TestDatabase,
    pub pool: PgPool,
    pub topic: herald_test::TestTopic,
}

/// Kafka, a fresh migrated database and a topic; `None` when a service is
/// missing outside CI.
pub async fn env(partitions: i32) -> Option<Env> {
    let kafka = herald_test::kafka()?;
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let pool = db.pool().await;
    herald_postgres::migrate(&pool).await.expect("migrate");
    let topic = kafka.topic("outbox", partitions).await;
    Some(Env {
        kafka,
        db,
        pool,
        topic,
    })
}

pub fn publisher(kafka: &herald_test::Kafka) -> Publisher {
    Publisher::new(&PublisherConfig::new(kafka.brokers(), "/outbox-tests")).expect("publisher")
}

pub fn relay(env: &Env, pool: PgPool) -> Relay<PgOutbox> {
    Relay::new(
        PgOutbox::new(pool),
        publisher(&env.kafka),
        RelayConfig {
            batch_size: 200,
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub key: String,
    pub event_id: Uuid,
    pub seq: u64,
    pub headers: BTreeMap<String, String>,
}

/// Every record of `topic` a `read_committed` reader sees, per partition in
/// offset order ([`herald_test::Kafka::read_to_end`]).
pub fn read_to_end(kafka: &herald_test::Kafka, topic: &str, partitions: i32) -> Vec<Read> {
    kafka
        .read_to_end(topic, partitions, "read_committed")
        .into_iter()
        .map(|message| {
            let headers: BTreeMap<String, String> = message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body: serde_json::Value =
                serde_json::from_slice(message.payload().expect("payload")).expect("json");
            Read {
                partition: message.partition(),
                key: String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8"),
                event_id: headers["event_id"].parse().expect("event id"),
                seq: body["seq"].as_u64().expect("seq"),
                headers,
            }
        })
        .collect()
}

/// Per key, the sequence numbers in the order Kafka holds them.
pub fn sequences(reads: &[Read]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in reads {
        out.entry(r.key.clone()).or_default().push(r.seq);
    }
    out
}

/// Enqueues `event` in its own committed transaction.
pub async fn enqueue_committed(pool: &PgPool, topic: &str, event: &TestEvent) {
    enqueue_committed_all(pool, topic, std::slice::from_ref(event)).await;
}

/// Enqueues `events`, in order, in one committed transaction.
pub async fn enqueue_committed_all(pool: &PgPool, topic: &str, events: &[TestEvent]) {
    let records: Vec<_> = events.iter().map(|e| record(topic, e)).collect();
    let mut tx = pool.begin().await.expect("begin");
    herald_postgres::outbox::enqueue_all(&mut tx, &records)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
}

/// Drives `relay` until the outbox backlog is empty and returns how many
/// records it published. Passes can come up empty while any transaction on
/// the server (other tests' included) is older than the rows: keep going
/// until the backlog is zero, within a bound.
pub async fn drain_all(relay: &Relay<PgOutbox>, pool: &PgPool) -> usize {
    until_drained(pool, async || relay.drain().await.expect("relay pass")).await
}

/// Calls `drain` until the outbox backlog is zero (within a bound); returns
/// what the calls published.
async fn until_drained(pool: &PgPool, mut drain: impl AsyncFnMut() -> usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut published = 0;
    loop {
        published += drain().await;
        let status = herald_postgres::outbox::status(pool).await.expect("status");
        if status.backlog == 0 {
            return published;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox not drained: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// This test's own exactly-once identity: its transactional-id prefix and
/// its checkpoint topic (tests share one broker; two outboxes must never
/// share either).
pub struct Exactly {
    pub prefix: String,
    pub checkpoints: herald_test::TestTopic,
}

impl Exactly {
    pub async fn new(kafka: &herald_test::Kafka) -> Self {
        Self {
            prefix: herald_test::unique_name("relay"),
            checkpoints: kafka
                .topic("checkpoints", i32::from(herald_postgres::RELAY_SLOTS))
                .await,
        }
    }

    pub fn config(&self) -> ExactlyOnceConfig {
        ExactlyOnceConfig {
            transactional_id_prefix: self.prefix.clone(),
            checkpoint_topic: self.checkpoints.name().to_owned(),
            ..ExactlyOnceConfig::default()
        }
    }

    /// An exactly-once relay over `outbox` with `hook` at its fault points.
    pub async fn relay(
        &self,
        brokers: &str,
        outbox: PgOutbox,
        hook: Option<FaultHook>,
    ) -> TransactionalRelay<PgOutbox> {
        self.relay_with(brokers, outbox, hook, self.config()).await
    }

    /// [`Exactly::relay`] with `config` (built on [`Exactly::config`]).
    pub async fn relay_with(
        &self,
        brokers: &str,
        outbox: PgOutbox,
        hook: Option<FaultHook>,
        config: ExactlyOnceConfig,
    ) -> TransactionalRelay<PgOutbox> {
        let relay = TransactionalRelay::new(
            outbox,
            &PublisherConfig::new(brokers, "/outbox-tests"),
            RelayConfig {
                batch_size: 50,
                poll_interval: Duration::from_millis(100),
                workers: 2,
                ..RelayConfig::default()
            },
            config,
        )
        .await
        .expect("exactly-once relay");
        match hook {
            Some(hook) => relay.with_fault_hook(hook),
            None => relay,
        }
    }
}

/// Drives an exactly-once relay until the outbox backlog is empty.
pub async fn drain_exactly(relay: &TransactionalRelay<PgOutbox>, pool: &PgPool) -> usize {
    until_drained(pool, async || match relay.drain().await {
        Ok(published) => published,
        // A slot a dead relay held may fail once (its transaction is still
        // being settled); the next pass takes it.
        Err(error) => {
            eprintln!("relay pass failed, retrying: {error}");
            0
        }
    })
    .await
}

/// A `read_committed` reader saw every committed event exactly once, and
/// each key's events in creation order.
pub fn assert_exactly_once_in_order(reads: &[Read], committed: &BTreeSet<Uuid>) {
    let mut seen = BTreeSet::new();
    let duplicates: Vec<Uuid> = reads
        .iter()
        .filter(|r| !seen.insert(r.event_id))
        .map(|r| r.event_id)
        .collect();
    assert!(
        duplicates.is_empty(),
        "{} events were read twice (first: {:?})",
        duplicates.len(),
        duplicates.first()
    );
    let lost: Vec<_> = committed.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{} committed events never reached Kafka",
        lost.len()
    );
    assert_eq!(&seen, committed, "only committed events reached Kafka");
    for (key, seqs) in sequences(reads) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
}

/// Waits until the outbox's status satisfies `done` (any server may be
/// down meanwhile: a failed read is just another look).
pub async fn outbox_reaches(
    pool: &PgPool,
    what: &str,
    limit: Duration,
    done: impl Fn(&herald_postgres::OutboxStatus) -> bool,
) {
    herald_test::poll_until(what, limit, async || {
        let status = herald_postgres::outbox::status(pool)
            .await
            .map_err(|e| e.to_string())?;
        if done(&status) {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
}

/// Waits until nothing is left to publish.
pub async fn drained(pool: &PgPool, limit: Duration) {
    outbox_reaches(pool, "the backlog to drain", limit, |s| s.backlog == 0).await;
}

/// Creates `effects`, the consumer tests' effect table: one row per
/// applied step, in the order applied.
pub async fn create_step_effects(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, \
         key TEXT NOT NULL, seq BIGINT NOT NULL)",
    )
    .execute(pool)
    .await
    .expect("effects table");
}

/// A step's effect: its row in `effects`.
pub async fn write_step(
    conn: &mut sqlx::PgConnection,
    step: &herald_test::events::Step,
) -> Result<(), herald::HandlerError> {
    sqlx::query("INSERT INTO effects (event_id, key, seq) VALUES ($1, $2, $3)")
        .bind(step.event_id)
        .bind(&step.key)
        .bind(step.seq as i64)
        .execute(&mut *conn)
        .await
        .map_err(herald_postgres::classify)?;
    Ok(())
}

/// Runs the ignored test `test` (its full path, e.g. `crash::relay_child`)
/// of this binary as a child process with `vars` set, output discarded:
/// the process a crash test kills.
pub fn spawn_child_test(test: &str, vars: &[(&str, &str)]) -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--ignored", "--nocapture"])
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {test}: {e}"))
}
