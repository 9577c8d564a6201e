//! Poison inside a transaction: undecodable inputs, permanent failures,
//! panics and exhausted transient failures land in `<topic>.dlq` exactly
//! once (read `read_committed`), written inside the transaction of the inputs
//! around them, and every later input is processed exactly once. Outputs
//! carry their input's trace context.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use herald::{Envelope, Event as _, HandlerError, RetryPolicy, TraceContext};
use herald_kafka::dlq::headers as dlq;
use herald_kafka::processor::{Input, Processor};
use herald_kafka::OutgoingRecord;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn step(key: &str, seq: u64) -> TestEvent {
    TestEvent::Step(Step {
        event_id: Uuid::new_v4(),
        key: key.to_owned(),
        seq,
        at: Utc::now(),
    })
}

fn record(topic: &str, event: &TestEvent) -> OutgoingRecord {
    let trace = TraceContext::new(TRACEPARENT, Some("vendor=1".into())).expect("traceparent");
    let envelope = Envelope::encode(event, "/tests")
        .expect("encode")
        .with_trace(Some(trace));
    OutgoingRecord::from_envelope(topic, &envelope)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_once_inside_the_transaction_and_later_inputs_flow() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    // One partition: every poison record sits in the middle of a batch.
    let input = kafka.topic("proc-poison-in", 1).await;
    let output = kafka.topic("proc-poison-out", 1).await;
    let dlq_topic = format!("{}.dlq", input.name());
    herald_test::create_topic(&kafka.config(), &dlq_topic, 1).await;

    let mut records = Vec::new();
    let mut good = Vec::new();
    let mut poison_offsets = BTreeMap::new();
    let mut seq: BTreeMap<&str, u64> = BTreeMap::new();
    let keys = ["a", "b", "c"];
    for i in 0..200u64 {
        let poison = match i {
            30 => Some("not-json"),
            70 => Some("permanent"),
            110 => Some("panic"),
            150 => Some("transient"),
            _ => None,
        };
        match poison {
            Some("not-json") => {
                let mut bad = record(input.name(), &step("a", 999));
                bad.payload = b"\xff\xfe not json".to_vec();
                poison_offsets.insert(i as i64, ("decode", bad.payload.clone()));
                records.push(bad);
            }
            Some(kind) => {
                let event = step(kind, 0);
                let r = record(input.name(), &event);
                let class = if kind == "transient" {
                    "transient"
                } else {
                    "permanent"
                };
                poison_offsets.insert(i as i64, (class, r.payload.clone()));
                records.push(r);
            }
            None => {
                // One flaky input; the rest on three keys.
                let key = if i == 190 {
                    "flaky"
                } else {
                    keys[(i % 3) as usize]
                };
                let n = seq.entry(key).or_default();
                let event = step(key, *n);
                *n += 1;
                records.push(record(input.name(), &event));
                good.push(event);
            }
        }
    }
    let publisher = publisher(&kafka);
    for r in &records {
        publisher.publish_record(r).await.expect("published");
    }

    let out = output.name().to_owned();
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let out = out.clone();
        async move {
            match step.key.as_str() {
                "permanent" => return Err(HandlerError::permanent("business rule says no")),
                "transient" => return Err(HandlerError::transient("always down")),
                "panic" => panic!("transform bug"),
                // Fails twice, then succeeds: retried, not dead-lettered.
                "flaky" if input.attempt <= 2 => {
                    return Err(HandlerError::transient("briefly down"))
                }
                _ => {}
            }
            Ok(vec![done_output(&out, "p", &step, &input)?])
        }
    };
    let config = config(
        &kafka,
        &herald_test::unique_name("proc-poison"),
        input.name(),
        "poison-1",
    )
    .batch_size(1000)
    .batch_time(Duration::from_secs(1))
    .retry(RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        multiplier: 2.0,
        deadline: None,
    });
    let group = config.group_id().to_owned();
    let processor = Processor::new(config, transform).expect("processor");
    let stats = processor.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    wait_all_committed(&kafka, &group, input.name(), 1, Duration::from_secs(120)).await;
    stop.cancel();
    task.await.expect("task").expect("processor stops cleanly");

    // Every good input exactly once, in order, with its trace context.
    let outputs = read_all(&kafka, output.name(), 1, "read_committed");
    let dones: Vec<Done> = outputs.iter().map(Collected::done).collect();
    assert_exactly_once_in_order(&dones, &good);
    for o in &outputs {
        let trace = o.envelope().trace.expect("outputs carry the input's trace");
        assert_eq!(trace.traceparent(), TRACEPARENT);
        assert_eq!(trace.tracestate(), Some("vendor=1"));
        assert_eq!(
            o.header("ce_source").as_deref(),
            Some("/herald-tests/processor")
        );
    }

    // Every poison input exactly once in the DLQ, bytes untouched.
    let dead = read_all(&kafka, &dlq_topic, 1, "read_committed");
    let mut by_offset = BTreeMap::new();
    for d in &dead {
        let offset: i64 = d
            .header(dlq::ORIGINAL_OFFSET)
            .expect("original offset")
            .parse()
            .expect("number");
        assert!(
            by_offset.insert(offset, d.clone()).is_none(),
            "input at offset {offset} dead-lettered twice"
        );
    }
    assert_eq!(
        by_offset.keys().collect::<Vec<_>>(),
        poison_offsets.keys().collect::<Vec<_>>(),
        "exactly the poison inputs are dead-lettered"
    );
    for (offset, (class, payload)) in &poison_offsets {
        let d = &by_offset[offset];
        assert_eq!(
            d.header(dlq::ERROR_CLASS).as_deref(),
            Some(*class),
            "offset {offset}"
        );
        assert_eq!(
            d.payload.as_deref(),
            Some(payload.as_slice()),
            "offset {offset}"
        );
        assert_eq!(d.header(dlq::ORIGINAL_TOPIC).as_deref(), Some(input.name()));
        assert_eq!(
            d.header(dlq::CONSUMER_GROUP).as_deref(),
            Some(group.as_str())
        );
    }
    let transient = &by_offset[&150];
    assert_eq!(transient.header(dlq::ATTEMPTS).as_deref(), Some("3"));
    assert!(stats.retried() >= 4, "flaky and transient were retried");
    assert!(
        stats.aborted() >= 1,
        "poison mid-batch aborted a transaction"
    );
    eprintln!(
        "committed {} transactions, aborted {}",
        stats.committed(),
        stats.aborted()
    );
}

/// Issue #20, scenario 5: an input whose second output is refused by the
/// producer (too large) after its first output joined the transaction:
/// none of its outputs commit, only its dead letter; the inputs around it
/// are processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_whose_later_output_is_refused_commits_none_of_its_outputs() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let input = kafka.topic("proc-split-in", 1).await;
    let output = kafka.topic("proc-split-out", 1).await;
    let dlq_topic = format!("{}.dlq", input.name());
    herald_test::create_topic(&kafka.config(), &dlq_topic, 1).await;
    let mut events: Vec<TestEvent> = (0..30).map(|seq| step("k", seq)).collect();
    let poisoned = step("split", 0);
    events.insert(10, poisoned.clone());
    let publisher = publisher(&kafka);
    for event in &events {
        publisher
            .publish_record(&record(input.name(), event))
            .await
            .expect("published");
    }

    let out = output.name().to_owned();
    let transform = move |TestEvent::Step(step): TestEvent, input: Input| {
        let out = out.clone();
        async move {
            let first = done_output(&out, "p", &step, &input)?;
            if step.key != "split" {
                return Ok(vec![first]);
            }
            // Over librdkafka's message.max.bytes: refused when it is sent,
            // after `first` is already in the transaction.
            let too_large = OutgoingRecord {
                payload: vec![b'x'; 2_000_000],
                ..first.clone()
            };
            Ok(vec![first, too_large])
        }
    };
    // One input per transaction: the poisoned input is alone in its own.
    let config = config(
        &kafka,
        &herald_test::unique_name("proc-split"),
        input.name(),
        "split-1",
    )
    .batch_size(1);
    let group = config.group_id().to_owned();
    let processor = Processor::new(config, transform).expect("processor");
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone().cancelled_owned()));
    wait_all_committed(&kafka, &group, input.name(), 1, Duration::from_secs(120)).await;
    stop.cancel();
    task.await.expect("task").expect("processor stops cleanly");

    let dones: Vec<Done> = committed_dones(&kafka, output.name(), 1);
    assert!(
        dones.iter().all(|d| d.input_id != poisoned.event_id()),
        "no output of the input whose later output was refused"
    );
    let good: Vec<TestEvent> = events
        .iter()
        .filter(|e| e.event_id() != poisoned.event_id())
        .cloned()
        .collect();
    assert_exactly_once_in_order(&dones, &good);
    let dead = read_all(&kafka, &dlq_topic, 1, "read_committed");
    assert_eq!(dead.len(), 1, "its dead letter, once");
    assert_eq!(dead[0].header(dlq::ORIGINAL_OFFSET).as_deref(), Some("10"));
}
