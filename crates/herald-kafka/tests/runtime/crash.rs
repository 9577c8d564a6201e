//! No loss on crash: a consumer process is SIGKILLed at random points,
//! restarted, and in the end every record was handled at least once, while
//! after every kill the committed offsets never pass an unhandled record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_kafka::{Consumer, ConsumerConfig, RecordInfo, Router};
use rand::Rng;

use crate::support::*;

const KEYS: usize = 40;
const PER_KEY: u64 = 400;
const PARTITIONS: i32 = 3;
const KILLS: usize = 4;

/// The child process: a consumer that appends `partition offset key seq` to
/// a log once per handled record. Only runs when spawned by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of crash::consumer_killed_at_random_points_loses_nothing"]
async fn crash_child() {
    let Some((topic, group, log)) = child_settings() else {
        return;
    };
    let brokers = herald_test::kafka().expect("kafka").brokers().to_owned();
    let file = LineLog::open(&log);
    let router = Router::new().handle(
        "logger",
        move |TestEvent::Step(step): TestEvent, record: RecordInfo| {
            let file = file.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                file.line(&format!(
                    "{} {} {} {}",
                    record.partition, record.offset, step.key, step.seq
                ));
                Ok(())
            }
        },
    );
    let config = ConsumerConfig::new(brokers, group, [topic])
        .concurrency(16)
        .commit_interval(Duration::from_millis(100));
    Consumer::new(config, router)
        .expect("consumer")
        .run(std::future::pending())
        .await
        .expect("consumer ran");
}

/// Handled (partition, offset) pairs, and how many lines.
fn handled(log: &Path) -> (BTreeSet<(i32, i64)>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut set = BTreeSet::new();
    let mut lines = 0;
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(p), Some(o)) = (parts.next(), parts.next()) else {
            continue;
        };
        set.insert((p.parse().expect("partition"), o.parse().expect("offset")));
        lines += 1;
    }
    (set, lines)
}

fn assert_commits_cover_only_handled(
    committed: &BTreeMap<i32, i64>,
    handled: &BTreeSet<(i32, i64)>,
) {
    for (partition, commit) in committed {
        for offset in 0..*commit {
            assert!(
                handled.contains(&(*partition, offset)),
                "partition {partition} committed at {commit} but offset {offset} was never handled"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_at_random_points_loses_nothing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let topic = kafka.topic("crash", PARTITIONS).await;
    publish_all(&publisher(&kafka), topic.name(), &steps(KEYS, PER_KEY)).await;
    let total = KEYS * PER_KEY as usize;
    let group = herald_test::unique_name("crash");
    let dir = std::env::temp_dir().join(herald_test::unique_name("herald-crash"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log: PathBuf = dir.join("handled.log");

    let mut rng = rand::thread_rng();
    for kill in 0..KILLS {
        let (_, before) = handled(&log);
        let mut child = spawn_child("crash::crash_child", topic.name(), &group, &log);
        // Kill after a random amount of progress, while records are in flight.
        let target = before + rng.gen_range(500..total / KILLS);
        wait_until("child progress", Duration::from_secs(120), || {
            handled(&log).1 >= target
        })
        .await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        let (done, lines) = handled(&log);
        let committed = kafka.committed(&group, topic.name(), PARTITIONS);
        assert_commits_cover_only_handled(&committed, &done);
        eprintln!(
            "kill {kill}: {lines} handled lines, {} distinct, committed {committed:?}",
            done.len()
        );
    }

    let mut child = spawn_child("crash::crash_child", topic.name(), &group, &log);
    wait_until("every record handled", Duration::from_secs(180), || {
        handled(&log).0.len() >= total
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");

    let (done, lines) = handled(&log);
    let end = kafka.end_offsets(topic.name(), PARTITIONS);
    let expected: BTreeSet<(i32, i64)> = end
        .iter()
        .flat_map(|(p, high)| (0..*high).map(move |o| (*p, o)))
        .collect();
    assert_eq!(
        done, expected,
        "every produced record was handled at least once"
    );
    assert!(lines >= total);
    assert_commits_cover_only_handled(&kafka.committed(&group, topic.name(), PARTITIONS), &done);
    std::fs::remove_dir_all(&dir).ok();
}
