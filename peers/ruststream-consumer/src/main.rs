//! Consumes `--records` herald-bench records with RustStream 0.7.7
//! (ruststream-rdkafka 0.7.1): a typed serde handler that does nothing,
//! `Commit::Tracked`, `workers(64, by_key)` lanes by record key, and the
//! librdkafka settings given with `--set key=value` (herald-bench passes
//! herald's consumer defaults). Prints one line of JSON: records, seconds
//! from the first record to the last, peak RSS.
//!
//! Usage: ruststream-consumer BROKERS TOPIC GROUP RECORDS [--set key=value]...

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use ruststream::subscriber;
use ruststream_rdkafka::prelude::*;
use serde::Deserialize;

/// What the handler's subscription reads, set once from the command line.
struct Settings {
    brokers: String,
    topic: String,
    group: String,
    records: u64,
    librdkafka: Vec<(String, String)>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static SEEN: AtomicU64 = AtomicU64::new(0);
static FIRST: OnceLock<Instant> = OnceLock::new();
static LAST: Mutex<Option<Instant>> = Mutex::new(None);
static DONE: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn settings() -> &'static Settings {
    SETTINGS
        .get()
        .expect("settings are set before the app starts")
}

/// herald-bench's event family, with the same serde shape (an internally
/// tagged enum), so that this side decodes what the others do.
#[derive(Debug, Deserialize)]
#[serde(tag = "event_type")]
#[allow(dead_code)]
enum BenchEvent {
    BenchRecord(BenchRecord),
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct BenchRecord {
    event_id: uuid::Uuid,
    key: String,
    seq: u64,
    at: chrono::DateTime<chrono::Utc>,
    pad: String,
}

#[subscriber(
    KafkaTopic::new(settings().topic.clone())
        .group(settings().group.clone())
        .commit(Commit::Tracked)
        .start(StartOffset::Earliest)
        .lane_key(LaneKey::RecordKey),
    workers(64, by_key)
)]
async fn handle(event: &BenchEvent) -> HandlerOutcome {
    std::hint::black_box(event);
    let now = Instant::now();
    FIRST.get_or_init(|| now);
    let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
    if seen >= settings().records {
        *LAST.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        DONE.notify_one();
    }
    HandlerOutcome::ack()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut next = |what: &str| args.next().ok_or_else(|| format!("missing {what}"));
    let (brokers, topic, group) = (next("BROKERS")?, next("TOPIC")?, next("GROUP")?);
    let records: u64 = next("RECORDS")?.parse()?;
    let mut librdkafka = Vec::new();
    while let Ok(flag) = next("--set") {
        if flag != "--set" {
            return Err(format!("unexpected argument {flag:?}").into());
        }
        let pair = next("key=value")?;
        let (key, value) = pair.split_once('=').ok_or("--set takes key=value")?;
        librdkafka.push((key.to_owned(), value.to_owned()));
    }
    let _ = SETTINGS.set(Settings {
        brokers,
        topic,
        group,
        records,
        librdkafka,
    });
    let app = RustStream::new(AppInfo::new("herald-bench-ruststream", "0.1.0")).with_broker(
        settings().librdkafka.iter().fold(
            KafkaBroker::new([settings().brokers.clone()]),
            |broker, (key, value)| broker.config(key.clone(), value.clone()),
        ),
        |b| {
            b.include(handle);
        },
    );
    app.run_until(DONE.notified()).await?;
    let first = *FIRST.get().ok_or("no record was handled")?;
    let last = LAST
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or("the last record was not seen")?;
    let seconds = last.duration_since(first).as_secs_f64();
    println!(
        "{{\"records\":{},\"seconds\":{seconds},\"peak_rss_kib\":{}}}",
        SEEN.load(Ordering::Relaxed),
        peak_rss_kib()
    );
    Ok(())
}
