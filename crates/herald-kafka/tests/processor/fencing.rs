//! Zombie fencing: while instance A hangs inside its transform with a
//! transaction open, instance B starts with the same instance id. B fences A
//! and takes over; A's writes never become visible to `read_committed`
//! readers, and A's `run` returns a fenced error once it wakes up.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_kafka::processor::{Input, Processor};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 20;
const PER_KEY: u64 = 50;
const PARTITIONS: i32 = 3;
/// A hangs on its 300th input, with 299 outputs in its open transaction.
const BLOCK_AT: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_fences_a_hung_zombie() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-fence-in", PARTITIONS).await;
    let output = kafka.topic("proc-fence-out", PARTITIONS).await;
    let inputs = steps(KEYS, PER_KEY);
    publish_all(&publisher(&kafka), input.name(), &inputs).await;
    let group = herald_test::unique_name("proc-fence");
    let instance = herald_test::unique_name("worker");
    let out = output.name().to_owned();

    // A: one long transaction; hangs on BLOCK_AT until released.
    let blocked = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let seen = Arc::new(AtomicUsize::new(0));
    let a_transform = {
        let (blocked, release, out) = (blocked.clone(), release.clone(), out.clone());
        move |TestEvent::Step(step): TestEvent, input: Input| {
            let (blocked, release, seen, out) =
                (blocked.clone(), release.clone(), seen.clone(), out.clone());
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) + 1 == BLOCK_AT {
                    blocked.store(true, Ordering::SeqCst);
                    release.notified().await;
                }
                Ok(vec![done_output(&out, "A", &step, &input)?])
            }
        }
    };
    let a_config = config(&kafka, &group, input.name(), &instance)
        .batch_size(100_000)
        .batch_time(Duration::from_secs(30))
        // A hung instance leaves the group after this, so B gets its partitions.
        .set("max.poll.interval.ms", "7000");
    let a = tokio::spawn(
        Processor::new(a_config, a_transform)
            .expect("processor A")
            .run(std::future::pending()),
    );
    wait_until("A hangs mid-transaction", Duration::from_secs(60), || {
        blocked.load(Ordering::SeqCst)
    })
    .await;

    // B: same instance id, hence the same transactional.id.
    let b_transform = {
        let out = out.clone();
        move |TestEvent::Step(step): TestEvent, input: Input| {
            let out = out.clone();
            async move { Ok(vec![done_output(&out, "B", &step, &input)?]) }
        }
    };
    let b_stop = CancellationToken::new();
    let b = tokio::spawn(
        Processor::new(config(&kafka, &group, input.name(), &instance), b_transform)
            .expect("processor B")
            .run(b_stop.clone().cancelled_owned()),
    );
    wait_all_committed(
        &kafka,
        &group,
        input.name(),
        PARTITIONS,
        Duration::from_secs(120),
    )
    .await;

    // The zombie wakes up, writes its output, and finds itself fenced.
    release.notify_one();
    let a_result = tokio::time::timeout(Duration::from_secs(90), a)
        .await
        .expect("A stops once it notices it is fenced")
        .expect("A's task");
    let error = a_result.expect_err("A must fail");
    assert!(error.is_fenced(), "A's error says it was fenced: {error}");
    eprintln!("A stopped with: {error}");

    b_stop.cancel();
    b.await.expect("B's task").expect("B stops cleanly");

    let committed: Vec<Done> = committed_dones(&kafka, output.name(), PARTITIONS);
    assert_exactly_once_in_order(&committed, &inputs);
    assert!(
        committed.iter().all(|d| d.instance == "B"),
        "no output of the zombie is visible to read_committed readers"
    );
    let written: Vec<Done> = read_all(&kafka, output.name(), PARTITIONS, "read_uncommitted")
        .iter()
        .map(Collected::done)
        .collect();
    let zombie_writes = written.iter().filter(|d| d.instance == "A").count();
    assert!(
        zombie_writes >= BLOCK_AT - 1,
        "the zombie did write ({zombie_writes} records), but only into its aborted transaction"
    );
}
