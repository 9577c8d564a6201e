//! A long broker outage under `orders run` (issue #20, scenario 1): one
//! process runs the API, the relay, the consumers and the fulfillment
//! processor while orders come in; the broker is SIGKILLed for a minute in
//! the middle of the load. The API keeps accepting orders into the outbox
//! meanwhile, `/readyz` says Kafka is away, the process never exits (the
//! processor makes a fresh transactional producer and resumes by itself),
//! and once the broker is back every accepted order is fulfilled,
//! notified and projected exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_test::private::PrivateKafka;

use crate::support::{
    place, placed, readiness, soak, wait_ready, Accepted, Fleet, Member, Timeline,
};

/// Orders placed; every fifth is cancelled once accepted, so the run moves
/// about 2.4 events per order through Kafka (order events, outcomes and
/// releases).
const ORDERS: usize = 2_500;
/// Orders posted per second: the load outlasts the outage, so orders come
/// in before, during and after it.
const RATE: u64 = 25;
const PARTITIONS: i32 = 3;
const CANCEL_EVERY: usize = 5;
/// How long the broker stays down.
const OUTAGE: Duration = Duration::from_secs(60);

/// Whether the API at `base` reports Kafka away in `/readyz`.
async fn kafka_reported_away(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let body = readiness(client, base).await?;
    if body["checks"]["kafka"] == false && body["status"] == "not_ready" {
        Ok(())
    } else {
        Err(body.to_string())
    }
}

/// The broker's outage: when it began (`None` while the broker is up), and
/// how many orders were accepted while it lasted.
#[derive(Default)]
struct Outage {
    since: Mutex<Option<Instant>>,
    accepted: AtomicUsize,
}

impl Outage {
    fn since(&self) -> Option<Instant> {
        *self.since.lock().expect("outage")
    }
}

/// Checks that `run` rode out the outage so far (still running, `/readyz`
/// saying Kafka is away), then starts the broker again.
async fn end_outage(
    kafka: &mut PrivateKafka,
    outage: &Outage,
    run: &mut Member,
    client: &reqwest::Client,
    base: &str,
    timeline: &Timeline,
) {
    let since = outage.since().expect("the broker is down");
    assert_eq!(
        run.exited(),
        None,
        "orders run exited {:.0?} into the outage",
        since.elapsed()
    );
    herald_test::poll_until("/readyz: Kafka away", Duration::from_secs(30), async || {
        kafka_reported_away(client, base).await
    })
    .await;
    timeline.note(format!(
        "broker: down {:.0?}, orders run still up, /readyz says Kafka is away; restarting",
        since.elapsed()
    ));
    tokio::task::block_in_place(|| kafka.restart());
    *outage.since.lock().expect("outage") = None;
    timeline.note(format!(
        "broker: up again ({} orders accepted while it was down)",
        outage.accepted.load(Ordering::SeqCst)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_run_rides_out_a_long_broker_outage() {
    let (Some(_), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let _serial = crate::support::one_at_a_time().await;
    let (orders, length) = (ORDERS * soak(), OUTAGE * soak() as u32);
    let timeline = Timeline::new();
    let mut kafka = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("kafka");
    let db = postgres.database().await;
    let brokers = kafka.brokers();
    let topic = herald_test::unique_name("order-events");
    let fulfillment_topic = format!("{topic}-fulfillment");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-broker-outage"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", db.url().to_owned()),
        ("ORDERS_EVENTS_TOPIC", topic.clone()),
        ("ORDERS_FULFILLMENT_TOPIC", fulfillment_topic.clone()),
        ("ORDERS_GROUP_PREFIX", herald_test::unique_name("outage")),
        ("ORDERS_TOPIC_PARTITIONS", PARTITIONS.to_string()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let http = format!("127.0.0.1:{}", herald_test::free_port());
    let mut fleet = Fleet(vec![Member::new(
        "run",
        &["run", "--http-addr", &http, "--metrics-addr", "127.0.0.1:0"],
        &env,
        &[],
        &log_dir,
    )]);
    fleet.0[0].start();
    let base = format!("http://{http}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    timeline.note("orders run up");

    let accepted = Arc::new(AtomicUsize::new(0));
    let outage = Arc::new(Outage::default());
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut posts = tokio::task::JoinSet::new();
    let load_start = tokio::time::Instant::now();
    let mut killed = false;
    for i in 0..orders {
        tokio::time::sleep_until(load_start + Duration::from_millis(i as u64 * 1000 / RATE)).await;
        if !killed && accepted.load(Ordering::SeqCst) >= orders / 4 {
            killed = true;
            kafka.kill();
            *outage.since.lock().expect("outage") = Some(Instant::now());
            timeline.note(format!(
                "broker: SIGKILL ({} accepted)",
                accepted.load(Ordering::SeqCst)
            ));
        }
        if outage
            .since()
            .is_some_and(|since| since.elapsed() >= length)
        {
            end_outage(
                &mut kafka,
                &outage,
                &mut fleet.0[0],
                &client,
                &base,
                &timeline,
            )
            .await;
        }
        let permit = Arc::clone(&limit).acquire_owned().await.expect("permit");
        let (client, base) = (client.clone(), base.clone());
        let (accepted, outage) = (Arc::clone(&accepted), Arc::clone(&outage));
        posts.spawn(async move {
            let id = place(&client, &base, &format!("broker-outage-{i}")).await;
            accepted.fetch_add(1, Ordering::SeqCst);
            if outage.since().is_some() {
                outage.accepted.fetch_add(1, Ordering::SeqCst);
            }
            if i % CANCEL_EVERY == 0 {
                crate::support::cancel(&client, &base, id).await;
            }
            drop(permit);
            (id, i % CANCEL_EVERY == 0)
        });
    }
    // A load that ended first waits out the outage.
    if let Some(since) = outage.since() {
        herald_test::wait_until("the outage's length", length * 2, || {
            since.elapsed() >= length
        })
        .await;
        end_outage(
            &mut kafka,
            &outage,
            &mut fleet.0[0],
            &client,
            &base,
            &timeline,
        )
        .await;
    }
    let (ids, cancelled) = placed(posts).await;
    assert!(killed, "the broker was killed during the load");
    assert!(
        outage.accepted.load(Ordering::SeqCst) > 0,
        "the API accepted orders while the broker was down"
    );
    assert_eq!(ids.len(), orders, "one order per Idempotency-Key");
    timeline.note(format!("load done: {} orders accepted", ids.len()));

    let pool = db.pool().await;
    let run = Accepted {
        ids,
        cancelled,
        brokers: brokers.clone(),
        fulfillment_topic,
        partitions: PARTITIONS,
    };
    run.wait_caught_up(&pool).await;
    assert_eq!(fleet.0[0].exited(), None, "orders run exited");
    timeline.note("caught up; stopping orders run gracefully");
    let unclean = fleet.stop();
    assert!(
        unclean.is_empty(),
        "orders run did not stop cleanly: {unclean:?}"
    );

    let report = timeline.text();
    let unreleased = run.assert_effectively_once(&pool, &report).await;
    timeline.note(format!(
        "{unreleased} cancelled orders kept their reservation (see Accepted::assert_effectively_once)"
    ));
    pool.close().await;
    drop(fleet);
    drop(kafka);
    std::fs::remove_dir_all(&log_dir).ok();
}
