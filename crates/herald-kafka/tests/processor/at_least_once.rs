//! The processor at least once (`Guarantee::AtLeastOnce`, no transactions):
//! every input yields its output, poison is dead-lettered once, and a batch's
//! input offsets are committed only after its outputs are in Kafka.
//!
//! The last point is checked at every commit: the transform's
//! [`Transform::commit`] runs right after the processor committed the
//! batch's offsets, and there the output topic's high watermarks must
//! already count every output of every committed input. The producer
//! lingers 300 ms, so a processor that committed before awaiting the
//! deliveries would be caught.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::{Envelope, HandlerError};
use herald_kafka::dlq::headers as dlq;
use herald_kafka::processor::{Guarantee, Input, Processor, Transform};
use herald_kafka::OutgoingRecord;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio_util::sync::CancellationToken;

use crate::support::*;
use herald_test::events::step;

const PARTITIONS: i32 = 3;

/// Makes one `Done` per step (and fails the step keyed `permanent`); at
/// every commit, compares what it made with what the output topic holds.
struct CheckingTransform {
    output: String,
    watermarks: BaseConsumer,
    /// Outputs of inputs not yet committed.
    pending: u64,
    /// Outputs of committed inputs.
    committed: u64,
    checks: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl CheckingTransform {
    fn output_records(&self) -> i64 {
        (0..PARTITIONS)
            .map(|p| {
                self.watermarks
                    .fetch_watermarks(&self.output, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .sum()
    }
}

impl Transform<TestEvent> for CheckingTransform {
    fn process(
        &mut self,
        TestEvent::Step(step): TestEvent,
        input: Input,
    ) -> impl std::future::Future<Output = Result<Vec<OutgoingRecord>, HandlerError>> + Send {
        let result = if step.key == "permanent" {
            Err(HandlerError::permanent("business rule says no"))
        } else {
            done_output(&self.output, "alo", &step, &input).map(|o| vec![o])
        };
        if let Ok(outputs) = &result {
            self.pending += outputs.len() as u64;
        }
        async move {
            // Slow enough for several batches to commit while inputs flow.
            tokio::time::sleep(Duration::from_millis(1)).await;
            result
        }
    }

    fn commit(&mut self) {
        self.committed += std::mem::take(&mut self.pending);
        let written = self.output_records();
        self.checks.fetch_add(1, Ordering::Relaxed);
        if written < self.committed as i64 {
            self.violations.lock().expect("lock").push(format!(
                "offsets committed for inputs with {} outputs, but the output topic holds {written}",
                self.committed
            ));
        }
    }

    fn rollback(&mut self) {
        self.pending = 0;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_outputs_every_input_and_commits_offsets_after_the_outputs() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-alo-in", PARTITIONS).await;
    let output = kafka.topic("proc-alo-out", PARTITIONS).await;
    let dlq_topic = format!("{}.dlq", input.name());
    herald_test::create_topic(&kafka.config(), &dlq_topic, 1).await;

    // Two poison inputs between two halves of the good ones: an
    // undecodable record and a step the transform refuses for good.
    let good = steps(20, 100);
    let (first, second) = good.split_at(good.len() / 2);
    let publisher = publisher(&kafka);
    publish_all(&publisher, input.name(), first).await;
    let mut poison = BTreeMap::new();
    let mut bad = OutgoingRecord::from_envelope(
        input.name(),
        &Envelope::encode(&step("undecodable", 0), "/tests").expect("encode"),
    );
    bad.payload = b"\xff not json".to_vec();
    let refused = OutgoingRecord::from_envelope(
        input.name(),
        &Envelope::encode(&step("permanent", 0), "/tests").expect("encode"),
    );
    for (record, class) in [(bad, "decode"), (refused, "permanent")] {
        let at = publisher.publish_record(&record).await.expect("published");
        poison.insert((at.partition, at.offset), class);
    }
    publish_all(&publisher, input.name(), second).await;

    let checks = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let transform = CheckingTransform {
        output: output.name().to_owned(),
        watermarks: kafka.config().create().expect("watermark client"),
        pending: 0,
        committed: 0,
        checks: Arc::clone(&checks),
        violations: Arc::clone(&violations),
    };
    let config = config(
        &kafka,
        &herald_test::unique_name("proc-alo"),
        input.name(),
        "alo-1",
    )
    .guarantee(Guarantee::AtLeastOnce)
    .batch_size(50)
    // Outputs would sit in the producer for 300 ms unless awaited.
    .set_producer("linger.ms", "300");
    let group = config.group_id().to_owned();
    let processor = Processor::new(config, transform).expect("processor");
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    wait_all_committed(
        &kafka,
        &group,
        input.name(),
        PARTITIONS,
        Duration::from_secs(120),
    )
    .await;
    stop.cancel();
    task.await.expect("task").expect("processor stops cleanly");

    let violations = violations.lock().expect("lock").clone();
    assert!(
        violations.is_empty(),
        "offsets committed before their outputs were written: {violations:?}"
    );
    assert!(
        checks.load(Ordering::Relaxed) >= 2,
        "several batches were committed and checked"
    );

    // No crash, no rewind: exactly one output per good input, in order.
    let outputs = read_all(&kafka, output.name(), PARTITIONS, "read_uncommitted");
    let dones: Vec<Done> = outputs.iter().map(Collected::done).collect();
    assert_exactly_once_in_order(&dones, &good);
    assert_eq!(
        stats.aborted(),
        0,
        "a poison input never makes the inputs around it redo their work"
    );

    // Each poison input dead-lettered exactly once.
    let dead = read_all(&kafka, &dlq_topic, 1, "read_uncommitted");
    let mut by_position = BTreeMap::new();
    for d in &dead {
        let number = |name| -> i64 {
            d.header(name)
                .expect("original position")
                .parse()
                .expect("number")
        };
        let position = (
            number(dlq::ORIGINAL_PARTITION) as i32,
            number(dlq::ORIGINAL_OFFSET),
        );
        assert!(
            by_position
                .insert(position, d.header(dlq::ERROR_CLASS))
                .is_none(),
            "input {position:?} dead-lettered twice"
        );
    }
    let expected: BTreeMap<_, _> = poison
        .iter()
        .map(|(position, class)| (*position, Some((*class).to_owned())))
        .collect();
    assert_eq!(
        by_position, expected,
        "exactly the poison inputs, once each"
    );
}
