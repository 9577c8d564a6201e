//! `orders run` on a replicated cluster of the test's own (three KRaft
//! nodes, RF 3, `min.insync.replicas` 2; issue #18), under the faults a
//! cluster's operators and hardware bring:
//!
//! - a rolling restart of the three brokers (controlled shutdown, start,
//!   wait until no partition is under-replicated, next node) while orders
//!   come in: the service never exits and every accepted order reaches its
//!   final state once;
//! - two of the three brokers killed: with `acks=all` and a minimum of two
//!   in-sync replicas nothing can be written, so the API keeps accepting
//!   orders into the outbox and the relay holds them (backing off) until a
//!   broker returns; then every accepted order is fulfilled, notified and
//!   projected once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_test::cluster::PrivateKafkaCluster;

use crate::support::{lasting, soak, Accepted, OrdersRun, PacedLoad, Timeline};

const PARTITIONS: i32 = 3;
const CANCEL_EVERY: usize = 5;

/// A scenario's cluster, database and `orders run`, as [`start`] leaves
/// them.
struct Started {
    timeline: Timeline,
    cluster: PrivateKafkaCluster,
    brokers: String,
    db: herald_test::TestDatabase,
    run: OrdersRun,
}

/// Starts a cluster of the test's own (off the async threads: it blocks
/// for a while), a database and `orders run` on them (topics and groups
/// named after `name`), noting each on a new timeline.
async fn start(postgres: &herald_test::Postgres, name: &str) -> Started {
    let timeline = Timeline::new();
    let cluster = tokio::task::spawn_blocking(PrivateKafkaCluster::start)
        .await
        .expect("the cluster");
    let brokers = cluster.brokers();
    timeline.note(format!("cluster up: {brokers}"));
    let db = postgres.database().await;
    let run = OrdersRun::start(&brokers, db.url(), name, PARTITIONS).await;
    timeline.note("orders run up");
    Started {
        timeline,
        cluster,
        brokers,
        db,
        run,
    }
}

/// Waits until the pipeline has worked off `ids` and judges it, with `run`
/// stopped cleanly first (see [`Accepted::assert_effectively_once`]).
async fn judge(
    run: &mut OrdersRun,
    db: &herald_test::TestDatabase,
    brokers: String,
    load: PacedLoad,
    timeline: &Timeline,
) {
    let (ids, cancelled) = load.finish().await;
    timeline.note(format!("load done: {} orders accepted", ids.len()));
    let pool = db.pool().await;
    let accepted = Accepted {
        ids,
        cancelled,
        brokers,
        fulfillment_topic: run.fulfillment_topic.clone(),
        partitions: PARTITIONS,
    };
    accepted.wait_caught_up(&pool).await;
    assert_eq!(run.process().exited(), None, "orders run exited");
    timeline.note("caught up; stopping orders run gracefully");
    run.stop();
    accepted
        .assert_effectively_once(&pool, &timeline.text())
        .await;
    pool.close().await;
}

/// Orders posted per second during the rolling restart; the load lasts
/// until the third node is back in sync, and at least [`ROLLING_ORDERS`].
const ROLLING_RATE: u64 = 30;
const ROLLING_ORDERS: usize = 900;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_brokers_loses_and_repeats_nothing() {
    let (Some(_), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let _serial = crate::support::one_at_a_time().await;
    let Started {
        timeline,
        mut cluster,
        brokers,
        db,
        mut run,
    } = start(&postgres, "cluster-rolling").await;

    let done = Arc::new(AtomicBool::new(false));
    let load = PacedLoad::start_until(
        &run.client,
        &run.base,
        ROLLING_ORDERS * soak(),
        ROLLING_RATE,
        CANCEL_EVERY,
        "cluster-rolling",
        Arc::clone(&done),
    );
    // Orders flow before the first node goes, and between each two steps:
    // each restart happens under load, and the service took the previous
    // one in its stride.
    let mut flowing = 100;
    for round in 0..soak() {
        for node in cluster.node_ids() {
            load.wait_accepted(flowing).await;
            let since = Instant::now();
            tokio::task::block_in_place(|| cluster.stop(node));
            timeline.note(format!(
                "round {round}: node {node} stopped (controlled) in {:.1?}, {} accepted",
                since.elapsed(),
                load.accepted()
            ));
            tokio::task::block_in_place(|| {
                cluster.start_node(node);
                cluster.wait_in_sync();
            });
            timeline.note(format!(
                "round {round}: node {node} back and every partition in sync after {:.1?}",
                since.elapsed()
            ));
            assert_eq!(
                run.process().exited(),
                None,
                "orders run exited during the restart of node {node}\n{}",
                timeline.text()
            );
            flowing = load.accepted() + 50;
        }
    }
    done.store(true, Ordering::SeqCst);
    judge(&mut run, &db, brokers, load, &timeline).await;
    drop(run);
    drop(cluster);
}

/// The two-brokers-down scenario's load: it outlasts the outage, so orders
/// come in before, during and after it.
const OUTAGE_ORDERS: usize = 1_500;
const OUTAGE_RATE: u64 = 25;
/// How long two brokers stay down.
const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_three_brokers_down_orders_wait_in_the_outbox() {
    let (Some(_), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let _serial = crate::support::one_at_a_time().await;
    let Started {
        timeline,
        mut cluster,
        brokers,
        db,
        mut run,
    } = start(&postgres, "cluster-two-down").await;
    let pool = db.pool().await;

    let orders = OUTAGE_ORDERS * soak();
    let load = PacedLoad::start(
        &run.client,
        &run.base,
        orders,
        OUTAGE_RATE,
        CANCEL_EVERY,
        "cluster-two-down",
    );
    load.wait_accepted(orders / 5).await;
    // The node that coordinates the fulfillment processor's group goes and
    // stays down: librdkafka must find the new coordinator for the
    // processor's transactional offset commits (a call that once hung for
    // good there: confluentinc/librdkafka#5456, #5511).
    let group = format!("{}-fulfillment", run.group_prefix);
    let coordinator = tokio::task::block_in_place(|| cluster.group_coordinator(&group));
    let survivor = cluster.node_other_than(&[coordinator]);
    let returning = cluster.node_other_than(&[coordinator, survivor]);
    // Two at once: the survivor is alone, a minority of the controller
    // quorum, and no partition can gather two in-sync replicas.
    tokio::task::block_in_place(|| {
        cluster.kill(coordinator);
        cluster.kill(returning);
    });
    let before = load.accepted();
    timeline.note(format!(
        "nodes {coordinator} (the processor group's coordinator) and {returning}: SIGKILL ({before} accepted)"
    ));
    lasting(OUTAGE * soak() as u32, run.process()).await;
    let during = load.accepted() - before;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_outbox_pending")
        .fetch_one(&pool)
        .await
        .expect("pending");
    timeline.note(format!(
        "after {OUTAGE:?}: orders run up, {during} orders accepted meanwhile, {pending} events waiting in the outbox"
    ));
    assert!(
        during > 0,
        "the API accepted orders with two brokers down\n{}",
        timeline.text()
    );
    // acks=all with one broker of three must not succeed: what the API
    // accepted meanwhile can only be in the outbox still.
    assert!(
        pending > 0,
        "events waited in the outbox while no write could reach two in-sync replicas\n{}",
        timeline.text()
    );

    tokio::task::block_in_place(|| cluster.start_node(returning));
    timeline.note(format!(
        "node {returning} back: two of three up, the group's old coordinator still down"
    ));
    judge(&mut run, &db, brokers, load, &timeline).await;
    pool.close().await;
    drop(run);
    drop(cluster);
}
