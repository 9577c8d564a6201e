//! Broker outages longer than the transaction timeout (issue #20, scenario
//! 1): the processor, mid-stream with a transaction open, loses its broker.
//! It must come back (a fresh transactional producer, fence-safe, resuming
//! from the committed offsets: by itself, or, when the broker timed its
//! transaction out, through its supervisor making a fresh processor), keep
//! running, and commit exactly one output per input, in key order.
//!
//! Two ways to lose the broker: it is killed for 40 s (then whether the
//! coordinator times the open transaction out before the producer aborts it
//! is a race), or the link to it is cut for longer than the transaction
//! timeout and the coordinator's check interval while the broker runs (the
//! coordinator then aborts it first and bumps the producer's epoch, which
//! the producer reports as fenced).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_kafka::processor::{Input, Processor, ProcessorStats};
use herald_test::private::PrivateKafka;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KEYS: usize = 50;
const PER_PHASE: u64 = 50;
const PARTITIONS: i32 = 3;
const OUTAGE: Duration = Duration::from_secs(40);

/// The steps of `KEYS` keys numbered `from..from + PER_PHASE`.
fn phase(from: u64) -> Vec<TestEvent> {
    (from..from + PER_PHASE)
        .flat_map(|seq| (0..KEYS).map(move |k| herald_test::events::step(&format!("key-{k}"), seq)))
        .collect()
}

/// A processor mid-stream on a private broker: the first phase published,
/// a third of it committed, a transaction open.
struct MidStream {
    kafka: herald_test::Kafka,
    input: herald_test::TestTopic,
    output: herald_test::TestTopic,
    publisher: herald_kafka::Publisher,
    group: String,
    first: Vec<TestEvent>,
    stats: Arc<ProcessorStats>,
    /// Processors this test replaced after a timed-out transaction (the
    /// processor counts its own restarts in `stats`).
    replaced: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), herald_kafka::ProcessorError>>,
}

impl MidStream {
    async fn start(broker: &PrivateKafka) -> MidStream {
        let kafka = herald_test::Kafka::at(broker.brokers());
        let input = kafka.topic("outage-in", PARTITIONS).await;
        let output = kafka.topic("outage-out", PARTITIONS).await;
        let publisher = publisher(&kafka);
        let first = phase(0);
        publish_all(&publisher, input.name(), &first).await;

        let group = herald_test::unique_name("outage");
        let out = output.name().to_owned();
        let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
            let out = out.clone();
            async move {
                // Slow enough that a transaction is open when the broker goes.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(vec![done_output(&out, "outage", &step, &input)?])
            }
        };
        let config = config(&kafka, &group, input.name(), "outage")
            // Shorter than the outage: the broker aborts the open transaction
            // while the producer cannot hear of it.
            .transaction_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(10));
        let stats = Arc::new(ProcessorStats::default());
        let replaced = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        // As a supervisor does: a processor whose transaction the broker
        // timed out while it was unreachable is replaced by a fresh one (it
        // restarts itself after other outage errors).
        let task = tokio::spawn({
            let (stats, replaced, stop) = (Arc::clone(&stats), Arc::clone(&replaced), stop.clone());
            async move {
                loop {
                    let processor = Processor::new(config.clone(), transform.clone())
                        .expect("processor")
                        .with_stats(Arc::clone(&stats));
                    match processor.run(stop.clone().cancelled_owned()).await {
                        Err(error) if error.is_transaction_expired() => {
                            eprintln!("{error}: starting a fresh processor");
                            replaced.fetch_add(1, Ordering::Relaxed);
                        }
                        ended => return ended,
                    }
                }
            }
        });
        wait_until(
            "a third of the inputs committed",
            Duration::from_secs(120),
            || stats.committed_inputs() >= first.len() as u64 / 3,
        )
        .await;
        MidStream {
            kafka,
            input,
            output,
            publisher,
            group,
            first,
            stats,
            replaced,
            stop,
            task,
        }
    }

    /// Publishes the second phase, waits until every input is committed
    /// and judges the outputs: one per input, in key order, the processor
    /// still running. `broker` is asked for its state and log on a time-out.
    async fn finish(self, broker: &mut PrivateKafka) {
        let second = phase(PER_PHASE);
        publish_all(&self.publisher, self.input.name(), &second).await;
        let stats = &self.stats;
        let back = Instant::now();
        if let Err(why) = all_committed_within(
            &self.kafka,
            &self.group,
            self.input.name(),
            PARTITIONS,
            Duration::from_secs(240),
        )
        .await
        {
            panic!(
                "{why}\nprocessor after the outage: {stats:?}\nprocessor task ended: {}\nbroker running: {}\nthe broker's log (last lines):\n{}",
                self.task.is_finished(),
                broker.is_running(),
                broker.log_tail(80)
            );
        }
        eprintln!(
            "every input committed {:?} after the second phase was published; processor restarts: {}, replaced: {}",
            back.elapsed(),
            stats.restarts(),
            self.replaced.load(Ordering::Relaxed)
        );
        assert!(
            !self.task.is_finished(),
            "the processor is still running after the outage (restarts: {}, replaced: {})",
            stats.restarts(),
            self.replaced.load(Ordering::Relaxed)
        );
        let inputs: Vec<TestEvent> = self.first.into_iter().chain(second).collect();
        let dones = committed_dones(&self.kafka, self.output.name(), PARTITIONS);
        // `duplicates` may be above zero: a processor restarted after the
        // outage can read inputs again that a transaction it saw fail had
        // committed, and its deduplication filter drops them.
        eprintln!("processor after the outage: {stats:?}");
        assert_exactly_once_in_order(&dones, &inputs);
        self.stop.cancel();
        self.task
            .await
            .expect("task")
            .expect("processor stopped cleanly");
        // The topics go first, while their broker still answers.
        drop((self.input, self.output));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_broker_outage_mid_transaction_is_survived_exactly_once() {
    // The shared broker proves the installation; the outage is on a broker
    // of this test's own.
    if herald_test::kafka().is_none() {
        return;
    }
    let _serial = one_at_a_time().await;
    let mut broker = tokio::task::spawn_blocking(PrivateKafka::start)
        .await
        .expect("private broker");
    let run = MidStream::start(&broker).await;

    broker.kill();
    let killed = Instant::now();
    eprintln!("broker killed: {:?}", run.stats);
    wait_until("the outage's length", OUTAGE * 2, || {
        killed.elapsed() >= OUTAGE
    })
    .await;
    let mut broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("restart");
    run.finish(&mut broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_broker_times_out_while_unreachable_is_survived_not_taken_for_a_fence() {
    if herald_test::kafka().is_none() {
        return;
    }
    let _serial = one_at_a_time().await;
    let mut broker = tokio::task::spawn_blocking(PrivateKafka::start_behind_proxy)
        .await
        .expect("private broker");
    let run = MidStream::start(&broker).await;

    // The broker runs on; only the processor cannot reach it, for longer
    // than the transaction timeout (10 s) plus the coordinator's check
    // interval (10 s, the broker's default): the coordinator aborts the open
    // transaction and bumps the epoch before the producer can.
    broker.proxy().cut();
    let cut = Instant::now();
    eprintln!("link cut: {:?}", run.stats);
    wait_until("the link's outage", Duration::from_secs(60), || {
        cut.elapsed() >= Duration::from_secs(25)
    })
    .await;
    broker.proxy().restore();
    // Whichever way the producer learns of it (fenced by the bumped epoch,
    // an invalid transactional state, a timed-out abort), the processor is
    // not taken for a fenced zombie: it (or a fresh one) goes on and
    // commits every input once.
    run.finish(&mut broker).await;
}
