//! The publisher on a replicated cluster of the test's own (three nodes,
//! RF 3, `min.insync.replicas` 2; issue #18) when a partition leader's
//! broker dies with SIGKILL in the middle of a load.
//!
//! Several tasks publish with one `Publisher` and its production defaults
//! (`acks=all`, idempotence), each task its own keys, each key's steps
//! numbered in order. Once a third of the load is acknowledged the node
//! that leads partition 0 is killed; the tasks keep publishing through the
//! leader election. Then the topic is read back and judged:
//!
//! - every acknowledged record is on the topic, at the partition and
//!   offset its acknowledgement named (`acks=all`: an acknowledged write
//!   survives its leader);
//! - no record is there twice, and each key's steps are in increasing
//!   order (idempotence: the producer's retries to the new leader neither
//!   repeat nor reorder a batch);
//! - nothing is there that was not published.
//!
//! A record whose publish failed may be absent (or present: its write may
//! have reached the replicas before the answer was lost); such records are
//! counted and printed. The kill must really fall inside the load: records
//! are acknowledged before it, and after it on the partitions the dead node
//! led (the failover carried writes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::Event;
use herald_test::cluster::PrivateKafkaCluster;
use herald_test::faults::Timeline;
use rdkafka::Message;
use uuid::Uuid;

use crate::support::*;

const KEYS: usize = 300;
const PER_KEY: u64 = 100;
const PARTITIONS: i32 = 3;
/// Tasks publishing side by side; task `t` owns the keys `k` with
/// `k % LANES == t`, so each key's steps come from one task, in order.
const LANES: usize = 6;
/// Steps of each of a task's keys per `publish_batch` call.
const STEPS_PER_CALL: u64 = 4;

/// What became of one published step.
struct Outcome {
    key: String,
    seq: u64,
    event_id: Uuid,
    result: Result<herald_kafka::Delivered, String>,
    /// Its call returned after the kill.
    after_kill: bool,
}

/// Task `lane`'s share of the load: its keys' steps, `STEPS_PER_CALL` at a
/// time, each call awaited before the next (a key's next steps are never
/// in flight beside a call that may still fail).
async fn publish_lane(
    publisher: herald_kafka::Publisher,
    topic: String,
    lane: usize,
    acked: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let keys: Vec<String> = (lane..KEYS)
        .step_by(LANES)
        .map(|k| format!("key-{k}"))
        .collect();
    let mut outcomes = Vec::new();
    for first in (0..PER_KEY).step_by(STEPS_PER_CALL as usize) {
        let events: Vec<TestEvent> = (first..(first + STEPS_PER_CALL).min(PER_KEY))
            .flat_map(|seq| {
                keys.iter()
                    .map(move |key| herald_test::events::step(key, seq))
            })
            .collect();
        let results = publisher.publish_batch(&topic, &events).await;
        let after_kill = killed.load(Ordering::SeqCst);
        for (event, result) in events.iter().zip(results) {
            let TestEvent::Step(step) = event;
            if result.is_ok() {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            outcomes.push(Outcome {
                key: step.key.clone(),
                seq: step.seq,
                event_id: event.event_id(),
                result: result.map_err(|e| e.to_string()),
                after_kill,
            });
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_killed_mid_load_loses_no_acknowledged_record() {
    // The shared broker proves the installation (and makes CI fail rather
    // than skip); the kill is on a cluster of this test's own.
    if herald_test::kafka().is_none() {
        return;
    }
    let timeline = Timeline::new();
    let mut cluster = tokio::task::spawn_blocking(PrivateKafkaCluster::start)
        .await
        .expect("the cluster");
    let kafka = cluster.kafka();
    let topic = kafka.topic("cluster-publish", PARTITIONS).await;
    timeline.note(format!("cluster up at {}", cluster.brokers()));

    let publisher = publisher(&kafka);
    let acked = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = (0..LANES)
        .map(|lane| {
            tokio::spawn(publish_lane(
                publisher.clone(),
                topic.name().to_owned(),
                lane,
                Arc::clone(&acked),
                Arc::clone(&killed),
            ))
        })
        .collect();

    let total = KEYS * PER_KEY as usize;
    wait_until(
        "a third of the load acknowledged",
        Duration::from_secs(120),
        || acked.load(Ordering::Relaxed) >= total / 3,
    )
    .await;
    let (victim, led) = tokio::task::block_in_place(|| {
        let victim = cluster.leader(topic.name(), 0);
        let led: BTreeSet<i32> = (0..PARTITIONS)
            .filter(|&p| cluster.leader(topic.name(), p) == victim)
            .collect();
        cluster.kill(victim);
        (victim, led)
    });
    killed.store(true, Ordering::SeqCst);
    timeline.note(format!(
        "[SIGKILL] node {victim}, leader of partitions {led:?}, with {} of {total} acknowledged",
        acked.load(Ordering::Relaxed)
    ));

    let mut outcomes = Vec::with_capacity(total);
    for lane in lanes {
        outcomes.extend(lane.await.expect("publishing task"));
    }
    let successor = tokio::task::block_in_place(|| cluster.leader(topic.name(), 0));
    timeline.note(format!(
        "load done: {} acknowledged; partition 0 now led by node {successor}",
        acked.load(Ordering::Relaxed)
    ));
    let context = format!(
        "{}\nthe log of node {successor} (last lines):\n{}",
        timeline.text(),
        cluster.log_tail(successor, 40)
    );

    // The kill fell inside the load, and the failover carried writes.
    let before = outcomes
        .iter()
        .filter(|o| o.result.is_ok() && !o.after_kill)
        .count();
    let across = outcomes
        .iter()
        .filter(|o| o.after_kill)
        .filter(|o| matches!(&o.result, Ok(d) if led.contains(&d.partition)))
        .count();
    assert!(
        before > 0 && across > 0,
        "the kill did not fall inside the load: {before} acknowledged before it, \
         {across} after it on the dead node's partitions\n{context}"
    );
    assert_ne!(successor, victim, "a new leader for partition 0\n{context}");
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    eprintln!(
        "{total} published: {before} acknowledged before the kill, {across} after it on partitions {led:?}, {} failed",
        failed.len()
    );
    for o in failed.iter().take(5) {
        eprintln!("  failed: {} step {}: {:?}", o.key, o.seq, o.result);
    }

    // The topic as a reader sees it: per (partition, offset), the event.
    let mut at: HashMap<(i32, i64), Uuid> = HashMap::new();
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for message in kafka.read_to_end(topic.name(), PARTITIONS, "read_committed") {
        let TestEvent::Step(step) = herald_kafka::envelope_of(&message)
            .expect("an envelope")
            .decode::<TestEvent>()
            .expect("a step");
        at.insert((message.partition(), message.offset()), step.event_id);
        by_key.entry(step.key).or_default().push(step.seq);
        *seen.entry(step.event_id).or_default() += 1;
    }

    let lost: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            let delivered = o.result.as_ref().ok()?;
            let found = at.get(&(delivered.partition, delivered.offset));
            (found != Some(&o.event_id)).then(|| {
                format!(
                    "{} step {} acknowledged at {}/{}, found {found:?}",
                    o.key, o.seq, delivered.partition, delivered.offset
                )
            })
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records are not where their acknowledgement put them, e.g. {:?}\n{context}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let twice: Vec<&Uuid> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} records are on the topic more than once, e.g. {:?}\n{context}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let published: BTreeSet<Uuid> = outcomes.iter().map(|o| o.event_id).collect();
    let foreign = seen.keys().filter(|id| !published.contains(id)).count();
    assert_eq!(foreign, 0, "records nobody published\n{context}");
    for (key, seqs) in &by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: steps out of order on the topic: {seqs:?}\n{context}"
        );
    }
    eprintln!(
        "{} records on the topic, every acknowledged one in place, once, in key order",
        seen.len()
    );
}
