//! A rolling restart under load (issue #20, scenario 12): every process of
//! the fleet (api, 2 relays, 2 workers, the processor) is stopped with
//! SIGTERM, waited for and started again, one at a time, twice over, while
//! orders come in. Every stop must be clean (exit 0), nothing may be lost
//! or applied twice, and the consumers' shutdowns commit what they
//! finished: at the end the groups' commits reach the end of the topic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{wait_ready, Accepted, Fleet, Member, PacedLoad, Timeline};

const ORDERS: usize = 2_100;
/// [`ORDERS`], times the soak factor.
fn orders() -> usize {
    ORDERS * crate::support::soak()
}
const RATE: u64 = 60;
const PARTITIONS: i32 = 3;
const CANCEL_EVERY: usize = 5;
const ROUNDS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_process_twice_loses_and_repeats_nothing() {
    let (Some(kafka), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let _serial = crate::support::one_at_a_time().await;
    let timeline = Timeline::new();
    let db = postgres.database().await;
    let topic = herald_test::unique_name("order-events");
    let fulfillment_topic = format!("{topic}-fulfillment");
    let prefix = herald_test::unique_name("rolling");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-rolling"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", kafka.brokers().to_owned()),
        ("DATABASE_URL", db.url().to_owned()),
        ("ORDERS_EVENTS_TOPIC", topic.clone()),
        ("ORDERS_FULFILLMENT_TOPIC", fulfillment_topic.clone()),
        ("ORDERS_GROUP_PREFIX", prefix.clone()),
        ("ORDERS_TOPIC_PARTITIONS", PARTITIONS.to_string()),
        ("ORDERS_DB_POOL", "6".to_owned()),
        ("ORDERS_PROCESSOR_BATCH", "50".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Member::new("migrate", &["migrate"], &env, &[], &log_dir).run_to_success();

    // Each member with an HTTP port of its own, to wait for its readiness.
    let mut bases = Vec::new();
    let mut members = Vec::new();
    for (name, command) in [
        ("api", "api"),
        ("relay-0", "relay"),
        ("relay-1", "relay"),
        ("worker-0", "worker"),
        ("worker-1", "worker"),
        ("processor", "processor"),
    ] {
        let addr = format!("127.0.0.1:{}", herald_test::free_port());
        let flag = if command == "api" {
            "--http-addr"
        } else {
            "--metrics-addr"
        };
        members.push(Member::new(
            name,
            &[command, flag, &addr],
            &env,
            &[],
            &log_dir,
        ));
        bases.push(format!("http://{addr}"));
    }
    let client = reqwest::Client::new();
    for member in &mut members {
        member.start();
    }
    for base in &bases {
        wait_ready(&client, base).await;
    }
    timeline.note("fleet up: api, 2 relays, 2 workers, processor");

    let done = Arc::new(AtomicBool::new(false));
    // Not spawned: readiness polls are not Send; joined with the load.
    let rolling = {
        let (client, bases, timeline, done) = (
            client.clone(),
            bases.clone(),
            timeline.clone(),
            Arc::clone(&done),
        );
        async move {
            let mut fleet = Fleet(members);
            for round in 0..ROUNDS {
                for (member, base) in fleet.0.iter_mut().zip(&bases) {
                    let mut child = member.child.take().expect("running");
                    let name = member.name.clone();
                    let ended = tokio::task::spawn_blocking(move || {
                        herald_test::stop_gracefully(
                            std::slice::from_mut(&mut child),
                            Duration::from_secs(60),
                        )
                    })
                    .await
                    .expect("stop");
                    assert!(
                        ended[0].is_some_and(|s| s.success()),
                        "{name} did not stop cleanly in round {round}: {ended:?}"
                    );
                    member.start();
                    wait_ready(&client, base).await;
                    timeline.note(format!("round {round}: {name} restarted"));
                }
            }
            done.store(true, Ordering::SeqCst);
            fleet
        }
    };

    // The load goes on until both rounds are through (and at least orders()
    // are placed).
    let load = PacedLoad::start_until(
        &client,
        &bases[0],
        orders(),
        RATE,
        CANCEL_EVERY,
        "rolling",
        Arc::clone(&done),
    );
    let (mut fleet, (ids, cancelled)) = tokio::join!(rolling, load.finish());
    timeline.note(format!("load done: {} orders accepted", ids.len()));

    let pool = db.pool().await;
    let run = Accepted {
        ids,
        cancelled,
        brokers: kafka.brokers().to_owned(),
        fulfillment_topic,
        partitions: PARTITIONS,
    };
    run.wait_caught_up(&pool).await;
    let report = timeline.text();
    let unclean = fleet.stop();
    assert!(
        unclean.is_empty(),
        "stopped uncleanly: {unclean:?}\n{report}"
    );
    run.assert_effectively_once(&pool, &report).await;
    // What the consumers finished, their shutdowns committed.
    let end = kafka.end_offsets(&topic, PARTITIONS);
    for kind in ["projection", "notifications"] {
        let committed = kafka.committed(&format!("{prefix}-{kind}"), &topic, PARTITIONS);
        assert_eq!(
            committed, end,
            "{kind}: commits at the end of {topic}\n{report}"
        );
    }
    std::fs::remove_dir_all(&log_dir).ok();
}
