//! The network between `orders run` and its broker fails (issue #20, the
//! harness's connection faults on Kafka): every connection librdkafka
//! makes goes through a [`herald_test::FaultProxy`] the broker advertises,
//! and during a paced load the link is delayed, black-holed for longer
//! than the consumers' session and the processor's message time-outs,
//! reset, and cut. `orders run` never exits, and once the link is healthy
//! every accepted order is fulfilled, notified and projected exactly once.

use std::time::Duration;

use herald_test::faults::Schedule;
use herald_test::private::PrivateKafka;

use crate::support::{lasting, soak, Accepted, OrdersRun, PacedLoad};

/// Orders placed; every fifth is cancelled once accepted, so about 6,000
/// events cross the link (order events, outcomes and releases).
const ORDERS: usize = 2_500;
/// Orders posted per second: the load spans every fault below.
const RATE: u64 = 30;
const PARTITIONS: i32 = 3;
const CANCEL_EVERY: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_run_rides_out_a_delayed_black_holed_and_cut_kafka_link() {
    let (Some(_), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let _serial = crate::support::one_at_a_time().await;
    let mut schedule = Schedule::from_env();
    let seed = schedule.seed();
    let orders = ORDERS * soak();
    let kafka = tokio::task::spawn_blocking(PrivateKafka::start_behind_proxy)
        .await
        .expect("kafka");
    let link = kafka.proxy().clone();
    let db = postgres.database().await;
    let brokers = kafka.brokers();
    let mut run = OrdersRun::start(&brokers, db.url(), "network", PARTITIONS).await;
    let (client, base) = (run.client.clone(), run.base.clone());
    schedule
        .timeline()
        .note("orders run up, its Kafka link through the proxy");

    let load = PacedLoad::start(
        &client,
        &base,
        orders,
        RATE,
        CANCEL_EVERY,
        &format!("network-{seed}"),
    );
    let process = run.process();
    let pool = db.pool().await;

    load.wait_accepted(orders / 10).await;
    let delay = schedule.between(Duration::from_millis(150), Duration::from_millis(400));
    schedule.step("link delayed", &format!("{delay:?} each way, for 10 s"));
    link.delay(delay);
    lasting(Duration::from_secs(10), process).await;
    link.restore();

    load.wait_accepted(orders * 3 / 10).await;
    // Past the consumers' 10 s session time-out and the processor's 30 s
    // message time-out at the longest: the group loses its members and
    // the transactional producer its batch.
    let silence = schedule.between(Duration::from_secs(15), Duration::from_secs(35));
    schedule.step(
        "link black-holed",
        &format!("{silence:?}, {} accepted", load.accepted()),
    );
    link.black_hole();
    lasting(silence, process).await;
    // The fault bit: the relay could publish nothing while it lasted, so
    // the orders accepted meanwhile wait in the outbox.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_outbox_pending")
        .fetch_one(&pool)
        .await
        .expect("pending");
    assert!(
        pending > 0,
        "nothing waited in the outbox during the black hole"
    );
    link.restore();
    schedule.step(
        "link restored",
        &format!("{pending} events were waiting in the outbox"),
    );

    // The pipeline catches up on a healthy link for a while, then its
    // connections are reset, and after a while more the link is cut.
    lasting(Duration::from_secs(3), process).await;
    schedule.step(
        "connections reset",
        &format!("{} accepted", load.accepted()),
    );
    link.reset_connections();
    lasting(Duration::from_secs(3), process).await;
    let cut = schedule.between(Duration::from_secs(3), Duration::from_secs(10));
    schedule.step(
        "link cut",
        &format!("{cut:?}, {} accepted", load.accepted()),
    );
    link.cut();
    lasting(cut, process).await;
    link.restore();
    schedule.step("link restored", "");

    let (ids, cancelled) = load.finish().await;
    assert_eq!(ids.len(), orders, "one order per Idempotency-Key");
    schedule
        .timeline()
        .note(format!("load done: {} orders accepted", ids.len()));

    let accepted = Accepted {
        ids,
        cancelled,
        brokers,
        fulfillment_topic: run.fulfillment_topic.clone(),
        partitions: PARTITIONS,
    };
    accepted.wait_caught_up(&pool).await;
    assert_eq!(run.process().exited(), None, "orders run exited");
    assert!(link.accepted() > 0, "the traffic went through the proxy");
    schedule
        .timeline()
        .note("caught up; stopping orders run gracefully");
    run.stop();
    let report = schedule.report();
    accepted.assert_effectively_once(&pool, &report).await;
    pool.close().await;
    drop(run);
    drop(kafka);
}
