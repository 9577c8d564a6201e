//! Poison never blocks, never vanishes: undecodable records, unknown types
//! and permanent handler failures go to `<topic>.dlq` with their original
//! bytes and headers, and the records behind them keep flowing.

use std::collections::HashMap;
use std::time::Duration;

use herald::{Envelope, HandlerError};
use herald_kafka::dlq::headers as dlq;
use herald_kafka::{Consumer, ConsumerConfig, DeadLetterMode, OutgoingRecord, RecordInfo, Router};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;

use crate::support::*;

const KEY: &str = "poisoned-key";

fn raw(topic: &str, payload: &[u8], headers: &[(&str, &[u8])], id: uuid::Uuid) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        key: Some(KEY.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Some(v.to_vec())))
            .collect(),
        event_id: id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dlq_with_original_bytes_and_the_key_keeps_flowing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("poison", 3).await;
    let publisher = publisher(&kafka);

    // A valid envelope to borrow headers from.
    let template = TestEvent::Step(Step {
        event_id: uuid::Uuid::new_v4(),
        key: KEY.into(),
        seq: 0,
        at: chrono::Utc::now(),
    });
    let envelope = Envelope::encode(&template, "/tests").expect("encode");
    let good_headers: Vec<(String, Vec<u8>)> = envelope
        .headers()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .collect();
    let header_refs: Vec<(&str, &[u8])> = good_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut renamed = header_refs.clone();
    for h in renamed.iter_mut() {
        if h.0 == "event_type" || h.0 == "ce_type" {
            h.1 = b"StepRenamed";
        }
    }

    let not_json: &[u8] = b"\xff\xfe not json at all \x00";
    let poison = [
        (
            "not-json",
            raw(topic.name(), not_json, &header_refs, uuid::Uuid::new_v4()),
        ),
        (
            "no-headers",
            raw(
                topic.name(),
                br#"{"event_type":"Step"}"#,
                &[],
                uuid::Uuid::nil(),
            ),
        ),
        (
            "empty",
            raw(topic.name(), b"", &header_refs, uuid::Uuid::new_v4()),
        ),
        (
            "unknown-type",
            raw(topic.name(), &envelope.payload, &renamed, envelope.event_id),
        ),
    ];
    for (_, record) in &poison {
        publisher
            .publish_record(record)
            .await
            .expect("poison published");
    }
    // Then a permanent failure and good records, all on the same key.
    let mut events = Vec::new();
    for seq in 1..=5 {
        events.push(TestEvent::Step(Step {
            event_id: uuid::Uuid::new_v4(),
            key: KEY.into(),
            seq,
            at: chrono::Utc::now(),
        }));
    }
    publish_all(&publisher, topic.name(), &events).await;

    let seen = Seen::default();
    let router = Router::new().handle("picky", {
        let seen = seen.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let seen = seen.clone();
            async move {
                if step.seq == 2 {
                    return Err(HandlerError::permanent("step 2 breaks a business rule"));
                }
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let group = herald_test::unique_name("poison");
    // Dead-letter and continue: parking the key is `parking.rs`'s test.
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
        .dead_letter_unknown(true)
        .dead_letter_mode(DeadLetterMode::Continue);
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    run_until(
        consumer,
        "good records after the poison",
        Duration::from_secs(60),
        || seen.len() >= 4,
    )
    .await;

    let seqs: Vec<u64> = seen.by_key()[KEY].clone();
    assert_eq!(
        seqs,
        vec![1, 3, 4, 5],
        "the key kept flowing past the poison"
    );
    assert_eq!(stats.dead_lettered(), 5);

    // Read the dead letters back.
    let reader: StreamConsumer = kafka
        .config()
        .set("group.id", herald_test::unique_name("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader");
    let dlq_topic = format!("{}.dlq", topic.name());
    reader.subscribe(&[&dlq_topic]).expect("subscribe");
    let mut letters = Vec::new();
    while letters.len() < 5 {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("dead letters arrive")
            .expect("read");
        let headers: HashMap<String, Vec<u8>> = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        letters.push((
            message.key().map(<[u8]>::to_vec),
            message.payload().unwrap_or_default().to_vec(),
            headers,
        ));
    }
    let text =
        |h: &HashMap<String, Vec<u8>>, k: &str| String::from_utf8(h[k].clone()).expect("utf-8");
    let mut classes: Vec<String> = letters
        .iter()
        .map(|(_, _, h)| text(h, dlq::ERROR_CLASS))
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        ["decode", "decode", "decode", "permanent", "unknown_type"]
    );
    for (key, payload, h) in &letters {
        assert_eq!(key.as_deref(), Some(KEY.as_bytes()), "original key kept");
        assert_eq!(text(h, dlq::ORIGINAL_TOPIC), topic.name());
        assert_eq!(text(h, dlq::ATTEMPTS), "1");
        assert_eq!(text(h, dlq::CONSUMER_GROUP), group);
        assert!(!text(h, dlq::ERROR).is_empty());
        for k in [
            dlq::ORIGINAL_PARTITION,
            dlq::ORIGINAL_OFFSET,
            dlq::FIRST_FAILED_AT,
            dlq::LAST_FAILED_AT,
        ] {
            assert!(h.contains_key(k), "{k} present");
        }
        let offset: i64 = text(h, dlq::ORIGINAL_OFFSET).parse().expect("offset");
        match offset {
            0 => {
                assert_eq!(payload.as_slice(), not_json, "original bytes kept exactly");
                assert_eq!(
                    h["event_id"],
                    good_headers
                        .iter()
                        .find(|(k, _)| k == "event_id")
                        .expect("id")
                        .1,
                    "original headers kept"
                );
            }
            2 => assert!(payload.is_empty()),
            3 => assert_eq!(text(h, dlq::ERROR_CLASS), "unknown_type"),
            5 => {
                assert_eq!(text(h, dlq::ERROR_CLASS), "permanent");
                assert_eq!(text(h, dlq::HANDLER), "picky");
            }
            _ => {}
        }
    }
    // Nothing is stuck behind the poison: the group committed to the end.
    assert_eq!(
        kafka.committed(&group, topic.name(), 3),
        kafka
            .end_offsets(topic.name(), 3)
            .into_iter()
            .filter(|(_, o)| *o > 0)
            .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_dead_lettered_after_the_retry_budget() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("exhausted", 1).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(1, 2)).await;
    let router = Router::new().handle(
        "flaky",
        |TestEvent::Step(step): TestEvent, _r: RecordInfo| async move {
            if step.seq == 0 {
                Err(HandlerError::transient("never recovers"))
            } else {
                Ok(())
            }
        },
    );
    let config = ConsumerConfig::new(
        kafka.brokers(),
        herald_test::unique_name("exhausted"),
        [topic.name()],
    )
    .dead_letter_mode(DeadLetterMode::Continue)
    .retry(herald::RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(10),
        multiplier: 2.0,
        deadline: None,
    });
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    run_until(
        consumer,
        "both records finished",
        Duration::from_secs(60),
        || stats.handled() == 1 && stats.dead_lettered() == 1,
    )
    .await;
    assert_eq!(stats.retried(), 2, "3 attempts = 2 retries");
}

/// Issue #20, scenario 7: a dead letter the broker refuses for good (its
/// DLQ topic takes no record that large) never lets the partition's commit
/// pass the record, and the failure is visible: counted, and tried again at
/// a bounded interval rather than in a silent loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_keeps_its_record_uncommitted_and_is_counted() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("dlq-refused", 1).await;
    // The DLQ (removed with the topic) refuses anything over 64 bytes: every
    // dead letter, with its headers, is larger. The cluster's replication
    // (-1), so that the refusal is the size, on a replicated cluster too.
    let admin: AdminClient<_> = kafka.config().create().expect("admin");
    let dlq = format!("{}.dlq", topic.name());
    let created = admin
        .create_topics(
            &[NewTopic::new(&dlq, 1, TopicReplication::Fixed(-1)).set("max.message.bytes", "64")],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create the DLQ");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let events: Vec<TestEvent> = (0..20)
        .map(|seq| {
            TestEvent::Step(Step {
                event_id: uuid::Uuid::new_v4(),
                key: format!("key-{}", seq % 4),
                seq,
                at: chrono::Utc::now(),
            })
        })
        .collect();
    publish_all(&publisher(&kafka), topic.name(), &events).await;
    let seen = Seen::default();
    // Step 3 (key-3, offset 3) breaks a business rule: dead-lettered at once.
    let router = Router::new().handle("picky", {
        let seen = seen.clone();
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let seen = seen.clone();
            async move {
                if step.seq == 3 {
                    return Err(HandlerError::permanent("step 3 breaks a business rule"));
                }
                seen.record(&step, record.partition, record.offset);
                Ok(())
            }
        }
    });
    let group = herald_test::unique_name("dlq-refused");
    let config = ConsumerConfig::new(kafka.brokers(), &group, [topic.name()])
        .commit_interval(Duration::from_millis(100));
    let consumer = Consumer::new(config, router).expect("consumer");
    let stats = consumer.stats();
    // Key-3's later records wait behind the unwritten dead letter; the
    // other keys' 15 records are handled.
    run_until(
        consumer,
        "other keys handled, three refused dead-letter writes",
        Duration::from_secs(60),
        || seen.len() >= 15 && stats.dead_letter_failures() >= 3,
    )
    .await;
    assert_eq!(stats.dead_lettered(), 0);
    assert!(
        !seen.by_key().contains_key("key-3"),
        "key-3's later records never overtook its unwritten dead letter"
    );
    let committed = kafka.committed(&group, topic.name(), 1);
    assert_eq!(
        committed.get(&0),
        Some(&3),
        "the commit reaches the record whose dead letter failed, never past it"
    );
}
