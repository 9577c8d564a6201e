//! Effectively once, end to end, under faults (issue #13): the service as
//! separate processes (1 API, 2 relays, 3 workers, 3 fulfillment
//! processors sharing the work, issue #18) on a Kafka broker and a PostgreSQL of the test's own, while
//! a seeded chaos loop SIGKILLs a random process about every second (and
//! starts it again), PostgreSQL is crashed once (immediate stop) and the
//! broker is SIGKILLed once. Clients retry each order with its
//! Idempotency-Key until it is accepted, as a production client does, and
//! cancel every fifth order once it is accepted. Orders have 1–3 lines of
//! 8 SKUs, so the stock runs out during the run and orders compete for it.
//!
//! After the load, every process is stopped gracefully and the run is
//! judged on what is durable: each accepted order exists once; on
//! `read_committed` it has exactly one fulfillment outcome (and a release
//! when it was cancelled after a reservation, or rejected after some SKUs
//! were set aside); the stock of each SKU is the initial stock minus what
//! the reserved, uncancelled orders hold; it has exactly one
//! notification per event; the read model holds its final state; the outbox
//! is empty.
//!
//! A failing run prints its seed and the timeline of faults;
//! `HERALD_FAULT_SEED=<seed>` replays the same schedule.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_test::faults::Schedule;
use herald_test::private::{PrivateKafka, PrivatePostgres};

use crate::support::{wait_ready, Accepted, Fleet, Member, PacedLoad};

const ORDERS: usize = 5_000;
/// [`ORDERS`], times the soak factor.
fn orders() -> usize {
    ORDERS * crate::support::soak()
}
/// Orders posted per second: the load lasts long enough for the faults.
const RATE: u64 = 100;
const PARTITIONS: i32 = 6;
/// Every this many orders, one is cancelled after it is accepted.
const CANCEL_EVERY: usize = 5;

/// The chaos loop: until `done`, SIGKILLs a random member every 0.3–1.2 s
/// (started again 0.1–0.5 s later), crashes PostgreSQL once a third of the
/// orders are accepted and SIGKILLs the broker at two thirds; members that
/// ended by themselves are started again, as a supervisor would.
struct Chaos {
    fleet: Fleet,
    kafka: PrivateKafka,
    postgres: PrivatePostgres,
    schedule: Schedule,
    accepted: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
}

impl Chaos {
    fn run(mut self) -> Self {
        let mut crashed_postgres = false;
        let mut killed_broker = false;
        let mut next_kill = Instant::now() + Duration::from_secs(2);
        while !self.done.load(Ordering::SeqCst) {
            self.restart_the_gone();
            let accepted = self.accepted.load(Ordering::SeqCst);
            if !crashed_postgres && accepted >= orders() / 3 {
                crashed_postgres = true;
                self.schedule
                    .step("PostgreSQL immediate stop", &format!("{accepted} accepted"));
                self.postgres.crash();
                std::thread::sleep(Duration::from_secs(2));
                self.postgres.restart();
                self.schedule.step("PostgreSQL restart", "");
            }
            if !killed_broker && accepted >= 2 * orders() / 3 {
                killed_broker = true;
                self.schedule
                    .step("broker SIGKILL", &format!("{accepted} accepted"));
                self.kafka.kill();
                std::thread::sleep(Duration::from_secs(2));
                self.kafka.restart();
                self.schedule.step("broker restart", "");
            }
            if Instant::now() >= next_kill {
                let victim = self.schedule.pick(self.fleet.0.len());
                let pause = self
                    .schedule
                    .between(Duration::from_millis(100), Duration::from_millis(500));
                let member = &mut self.fleet.0[victim];
                self.schedule.step("SIGKILL", &member.name);
                member.kill();
                std::thread::sleep(pause);
                member.start();
                next_kill = Instant::now()
                    + self
                        .schedule
                        .between(Duration::from_millis(300), Duration::from_millis(1200));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.restart_the_gone();
        self
    }

    fn restart_the_gone(&mut self) {
        for member in &mut self.fleet.0 {
            if let Some(status) = member.exited() {
                self.schedule.timeline().note(format!(
                    "{} ended by itself ({status}); starting it again",
                    member.name
                ));
                std::thread::sleep(Duration::from_millis(200));
                member.start();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_order_is_fulfilled_notified_and_projected_once_under_faults() {
    // The shared services prove the installation is there; the faults run
    // on servers of this test's own.
    if herald_test::kafka().is_none() || herald_test::postgres().is_none() {
        return;
    }
    let _serial = crate::support::one_at_a_time().await;
    let schedule = Schedule::from_env();
    let seed = schedule.seed();
    let timeline = schedule.timeline().clone();
    let kafka = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("kafka");
    let postgres = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .expect("postgres");
    let brokers = kafka.brokers();
    timeline.note(format!("servers up: Kafka {brokers}, PostgreSQL"));

    let topic = herald_test::unique_name("order-events");
    let fulfillment_topic = format!("{topic}-fulfillment");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-effectively-once"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let env: Vec<(String, String)> = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("DATABASE_URL", postgres.url()),
        ("ORDERS_EVENTS_TOPIC", topic.clone()),
        ("ORDERS_FULFILLMENT_TOPIC", fulfillment_topic.clone()),
        ("ORDERS_GROUP_PREFIX", herald_test::unique_name("eo")),
        ("ORDERS_TOPIC_PARTITIONS", PARTITIONS.to_string()),
        ("ORDERS_DB_POOL", "6".to_owned()),
        ("ORDERS_PROCESSOR_BATCH", "50".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let member = |name: &str, args: &[&str], extra: &[(&str, &str)]| {
        Member::new(name, args, &env, extra, &log_dir)
    };
    member("migrate", &["migrate"], &[]).run_to_success();

    let http = format!("127.0.0.1:{}", herald_test::free_port());
    let no_metrics = ["--metrics-addr", "127.0.0.1:0"];
    let mut members = vec![member("api", &["api", "--http-addr", &http], &[])];
    for i in 0..2 {
        members.push(member(
            &format!("relay-{i}"),
            &["relay", no_metrics[0], no_metrics[1]],
            &[],
        ));
    }
    for i in 0..3 {
        members.push(member(
            &format!("worker-{i}"),
            &["worker", no_metrics[0], no_metrics[1]],
            &[],
        ));
    }
    for i in 0..3 {
        let id = format!("p{i}");
        members.push(member(
            &format!("processor-{i}"),
            &["processor", no_metrics[0], no_metrics[1]],
            &[("ORDERS_INSTANCE_ID", &id)],
        ));
    }
    for m in &mut members {
        m.start();
    }
    let base = format!("http://{http}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    timeline.note("fleet up: api, 2 relays, 3 workers, 3 processors");

    let load = PacedLoad::start(
        &client,
        &base,
        orders(),
        RATE,
        CANCEL_EVERY,
        &format!("eo-order-{seed}"),
    );
    let done = Arc::new(AtomicBool::new(false));
    let chaos = Chaos {
        fleet: Fleet(members),
        kafka,
        postgres,
        schedule,
        accepted: load.counter(),
        done: Arc::clone(&done),
    };
    let chaos = std::thread::spawn(move || chaos.run());
    let (ids, cancelled) = load.finish().await;
    timeline.note(format!("load done: {} orders accepted", ids.len()));
    assert_eq!(ids.len(), orders(), "one order per Idempotency-Key");
    done.store(true, Ordering::SeqCst);
    let chaos = tokio::task::spawn_blocking(move || chaos.join().expect("chaos loop"))
        .await
        .expect("chaos");

    // The fleet works off what the faults left behind.
    let pool = sqlx::PgPool::connect(&chaos.postgres.url())
        .await
        .expect("pool");
    let run = Accepted {
        ids: ids.clone(),
        cancelled: cancelled.clone(),
        brokers: brokers.clone(),
        fulfillment_topic: fulfillment_topic.clone(),
        partitions: PARTITIONS,
    };
    run.wait_caught_up(&pool).await;
    timeline.note("caught up; stopping the fleet gracefully");
    let mut chaos = chaos;
    for (name, status) in chaos.fleet.stop() {
        timeline.note(format!("{name} stopped with {status:?}"));
    }

    // Judged on what is durable, with nothing running.
    let report = chaos.schedule.report();
    run.assert_effectively_once(&pool, &report).await;
    pool.close().await;
    drop(chaos);
    std::fs::remove_dir_all(&log_dir).ok();
}
