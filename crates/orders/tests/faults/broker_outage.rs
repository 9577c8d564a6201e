//! A long broker outage under `orders run` (issue #20, scenario 1): one
//! process runs the API, the relay, the consumers and the fulfillment
//! processor while orders come in; the broker is SIGKILLed for a minute in
//! the middle of the load. The API keeps accepting orders into the outbox
//! meanwhile, `/readyz` says Kafka is away, the process never exits (the
//! processor makes a fresh transactional producer and resumes by itself),
//! and once the broker is back every accepted order is fulfilled,
//! notified and projected exactly once.

use std::time::{Duration, Instant};

use herald_test::private::PrivateKafka;

use crate::support::{lasting, readiness, soak, Accepted, Member, OrdersRun, PacedLoad, Timeline};

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

/// Checks that `run` rode out the outage so far (still running, `/readyz`
/// saying Kafka is away), then starts the broker again.
async fn end_outage(
    kafka: &mut PrivateKafka,
    since: Instant,
    run: &mut Member,
    client: &reqwest::Client,
    base: &str,
    timeline: &Timeline,
) {
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
    let mut run = OrdersRun::start(&brokers, db.url(), "broker-outage", PARTITIONS).await;
    let (client, base) = (run.client.clone(), run.base.clone());
    timeline.note("orders run up");

    let load = PacedLoad::start(&client, &base, orders, RATE, CANCEL_EVERY, "broker-outage");
    load.wait_accepted(orders / 4).await;
    kafka.kill();
    let since = Instant::now();
    let before = load.accepted();
    timeline.note(format!("broker: SIGKILL ({before} accepted)"));
    lasting(length, run.process()).await;
    end_outage(&mut kafka, since, run.process(), &client, &base, &timeline).await;
    let during = load.accepted() - before;
    timeline.note(format!(
        "broker: up again ({during} orders accepted while it was down)"
    ));
    assert!(
        during > 0,
        "the API accepted orders while the broker was down"
    );
    let (ids, cancelled) = load.finish().await;
    assert_eq!(ids.len(), orders, "one order per Idempotency-Key");
    timeline.note(format!("load done: {} orders accepted", ids.len()));

    let pool = db.pool().await;
    let accepted = Accepted {
        ids,
        cancelled,
        brokers: brokers.clone(),
        fulfillment_topic: run.fulfillment_topic.clone(),
        partitions: PARTITIONS,
    };
    accepted.wait_caught_up(&pool).await;
    assert_eq!(run.process().exited(), None, "orders run exited");
    timeline.note("caught up; stopping orders run gracefully");
    run.stop();

    let report = timeline.text();
    accepted.assert_effectively_once(&pool, &report).await;
    pool.close().await;
    drop(run);
    drop(kafka);
}
