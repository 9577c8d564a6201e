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

use crate::support::{lasting, soak, wait_ready, Accepted, Fleet, Member, PacedLoad};

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
    let topic = herald_test::unique_name("order-events");
    let fulfillment_topic = format!("{topic}-fulfillment");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-network"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", db.url().to_owned()),
        ("ORDERS_EVENTS_TOPIC", topic.clone()),
        ("ORDERS_FULFILLMENT_TOPIC", fulfillment_topic.clone()),
        ("ORDERS_GROUP_PREFIX", herald_test::unique_name("network")),
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
    let run = &mut fleet.0[0];
    let pool = db.pool().await;

    load.wait_accepted(orders / 10).await;
    let delay = schedule.between(Duration::from_millis(150), Duration::from_millis(400));
    schedule.step("link delayed", &format!("{delay:?} each way, for 10 s"));
    link.delay(delay);
    lasting(Duration::from_secs(10), run).await;
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
    lasting(silence, run).await;
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
    lasting(Duration::from_secs(3), run).await;
    schedule.step(
        "connections reset",
        &format!("{} accepted", load.accepted()),
    );
    link.reset_connections();
    lasting(Duration::from_secs(3), run).await;
    let cut = schedule.between(Duration::from_secs(3), Duration::from_secs(10));
    schedule.step(
        "link cut",
        &format!("{cut:?}, {} accepted", load.accepted()),
    );
    link.cut();
    lasting(cut, run).await;
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
        fulfillment_topic,
        partitions: PARTITIONS,
    };
    accepted.wait_caught_up(&pool).await;
    assert_eq!(fleet.0[0].exited(), None, "orders run exited");
    assert!(link.accepted() > 0, "the traffic went through the proxy");
    schedule
        .timeline()
        .note("caught up; stopping orders run gracefully");
    let unclean = fleet.stop();
    assert!(
        unclean.is_empty(),
        "orders run did not stop cleanly: {unclean:?}"
    );
    let report = schedule.report();
    let unreleased = accepted.assert_effectively_once(&pool, &report).await;
    schedule.timeline().note(format!(
        "effectively once; {unreleased} cancelled orders kept their reservation"
    ));
    pool.close().await;
    drop(fleet);
    drop(kafka);
    std::fs::remove_dir_all(&log_dir).ok();
}
