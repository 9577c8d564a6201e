//! A PostgreSQL outage is not a poison record (issue #20, scenario 2): the
//! projection and notification consumers meet 5,000 valid events while
//! PostgreSQL is down for two minutes, many times their whole retry budget. The circuit
//! breaker pauses them (`/readyz` says `paused`), nothing is dead-lettered,
//! and once PostgreSQL is back every event reaches the read model and the
//! notification log.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_test::private::{PrivateKafka, PrivatePostgres};

use crate::support::{place, readiness, wait_ready, Fleet, Member, Timeline};

const ORDERS: usize = 5_000;
/// [`ORDERS`], times the soak factor.
fn orders() -> usize {
    ORDERS * crate::support::soak()
}
const PARTITIONS: i32 = 3;
/// How long PostgreSQL stays down (the two minutes): many times
/// the worker's retry budget below (2 attempts, each bounded by the pool's
/// 10 s acquire timeout).
const OUTAGE: Duration = Duration::from_secs(120);

/// Sends `signal` (STOP, CONT) to a member's process.
fn signal(member: &Member, signal: &str) {
    let pid = member.child.as_ref().expect("running").id().to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_longer_than_the_retry_budget_dead_letters_nothing() {
    if herald_test::kafka().is_none() || herald_test::postgres().is_none() {
        return;
    }
    let _serial = crate::support::one_at_a_time().await;
    let timeline = Timeline::new();
    let kafka = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("kafka");
    let postgres = Arc::new(
        tokio::task::spawn_blocking(PrivatePostgres::start)
            .await
            .expect("postgres"),
    );
    let brokers = kafka.brokers();
    let topic = herald_test::unique_name("order-events");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-outage"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", postgres.url()),
        ("ORDERS_EVENTS_TOPIC", topic.clone()),
        ("ORDERS_GROUP_PREFIX", herald_test::unique_name("outage")),
        ("ORDERS_TOPIC_PARTITIONS", PARTITIONS.to_string()),
        ("ORDERS_RETRY_ATTEMPTS", "2".to_owned()),
        ("ORDERS_RETRY_MAX_MS", "200".to_owned()),
        ("RUST_LOG", "warn,herald_kafka::consumer=info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let member = |name: &str, args: &[&str]| Member::new(name, args, &env, &[], &log_dir);
    member("migrate", &["migrate"]).run_to_success();
    let http = format!("127.0.0.1:{}", herald_test::free_port());
    let worker_http = format!("127.0.0.1:{}", herald_test::free_port());
    let no_metrics = ["--metrics-addr", "127.0.0.1:0"];
    let mut fleet = Fleet(vec![
        member("api", &["api", "--http-addr", &http]),
        member("relay", &["relay", no_metrics[0], no_metrics[1]]),
        member("worker", &["worker", "--metrics-addr", &worker_http]),
    ]);
    for m in &mut fleet.0 {
        m.start();
    }
    let (base, worker_base) = (format!("http://{http}"), format!("http://{worker_http}"));
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    wait_ready(&client, &worker_base).await;
    timeline.note("fleet up: api, relay, worker");

    // The worker sleeps while the orders are placed and relayed, so that
    // all their events wait for it in Kafka when PostgreSQL goes away.
    signal(&fleet.0[2], "STOP");
    let mut posts = tokio::task::JoinSet::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    for i in 0..orders() {
        let permit = Arc::clone(&limit).acquire_owned().await.expect("permit");
        let (client, base) = (client.clone(), base.clone());
        posts.spawn(async move {
            let id = place(&client, &base, &format!("outage-{i}")).await;
            drop(permit);
            id
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(id) = posts.join_next().await {
        ids.insert(id.expect("post"));
    }
    let pool = sqlx::PgPool::connect(&postgres.url()).await.expect("pool");
    herald_test::poll_until("the outbox relayed", Duration::from_secs(60), async || {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_outbox_pending")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
        if pending == 0 {
            Ok(())
        } else {
            Err(format!("{pending} pending"))
        }
    })
    .await;
    pool.close().await;
    timeline.note(format!("{} orders placed and relayed", ids.len()));

    let crashed = Instant::now();
    tokio::task::spawn_blocking({
        let postgres = Arc::clone(&postgres);
        move || postgres.crash()
    })
    .await
    .expect("crash");
    signal(&fleet.0[2], "CONT");
    timeline.note("PostgreSQL: immediate stop; worker resumed");

    let paused = herald_test::poll_until(
        "the worker's consumers paused by their breakers",
        Duration::from_secs(60),
        async || {
            let body = readiness(&client, &worker_base).await?;
            let consumers = &body["checks"]["consumers"];
            let states: Vec<&str> = consumers
                .as_object()
                .ok_or_else(|| body.to_string())?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            if !states.is_empty() && states.iter().all(|s| *s == "paused") {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        },
    )
    .await;
    assert_eq!(paused["status"], "not_ready", "{paused}");
    timeline.note(format!("worker not ready, consumers paused: {paused}"));
    herald_test::wait_until("the outage's length", OUTAGE * 2, || {
        crashed.elapsed() >= OUTAGE
    })
    .await;
    let body = readiness(&client, &worker_base).await.expect("readyz");
    assert!(
        body["checks"]["consumers"]
            .as_object()
            .expect("consumers")
            .values()
            .all(|v| v == "paused"),
        "still paused at the end of the outage: {body}"
    );
    tokio::task::spawn_blocking({
        let postgres = Arc::clone(&postgres);
        move || postgres.restart()
    })
    .await
    .expect("restart");
    timeline.note("PostgreSQL: started again");

    let pool = sqlx::PgPool::connect(&postgres.url()).await.expect("pool");
    herald_test::poll_until(
        "every event projected and notified",
        Duration::from_secs(180),
        async || {
            let (views, notified): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM order_views), (SELECT count(*) FROM notifications)",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
            if views >= orders() as i64 && notified >= orders() as i64 {
                Ok(())
            } else {
                Err(format!("views {views}, notifications {notified}"))
            }
        },
    )
    .await;
    timeline.note("caught up");
    wait_ready(&client, &worker_base).await;
    for (name, status) in fleet.stop() {
        timeline.note(format!("{name} stopped with {status:?}"));
    }
    let views: BTreeSet<uuid::Uuid> = sqlx::query_scalar("SELECT order_id FROM order_views")
        .fetch_all(&pool)
        .await
        .expect("views")
        .into_iter()
        .collect();
    assert_eq!(views, ids, "every accepted order in the read model");
    // The invariant checker: the outbox's events against the topic and the
    // notification log (one row per event it applied).
    let committed: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT event_id, aggregate_id FROM herald_outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("outbox");
    let effects: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT event_id, count(*) FROM notifications GROUP BY event_id")
            .fetch_all(&pool)
            .await
            .expect("notifications");
    let checked = herald_test::invariants::Check::new()
        .committed(committed)
        .effects(effects.into_iter().map(|(id, n)| (id, n as u64)))
        .read(
            &herald_test::Kafka::at(&brokers),
            &topic,
            PARTITIONS,
            Some(&format!("{topic}.dlq")),
        );
    let report = timeline.text();
    timeline.note(format!("invariants: {checked}"));
    checked.assert_clean(&report);
    assert_eq!(checked.committed, orders(), "{checked}");
    assert!(
        checked.dead_letters.is_empty(),
        "{} records dead-lettered during a dependency outage\n{report}",
        checked.dead_letters.len()
    );
    pool.close().await;
    drop(fleet);
    std::fs::remove_dir_all(&log_dir).ok();
}
