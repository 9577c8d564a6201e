//! The checks of the store contract, generic over a store ([`Harness`]).
//! Each takes a fresh store.
//!
//! Outbox (guarantees 1 and 4): publish iff commit; per-aggregate creation
//! order of claims, through small batches and partial commits; a second
//! claimer never gets an aggregate whose earlier row is claimed (skipped by
//! PostgreSQL, waited for by SQLite's serialized claims); concurrent claimers
//! and writers; late commits; mark vs delete; status and retention. Inbox
//! (guarantee 2): duplicates have one effect, failed effects leave no inbox
//! row, concurrent deliveries have one effect. The real relay into Kafka is
//! in `relay` (feature `kafka`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::{
    AfterPublish, Applied, HandlerError, InboxStore, OutboxBatch, OutboxStore, PendingRecord,
};
use rand::Rng;
use uuid::Uuid;

use crate::harness::{enqueue_committed, Harness, Rec};

const TOPIC: &str = "conformance";

/// The aggregate key and sequence number a record carries in its payload.
fn key_seq(record: &PendingRecord) -> (String, u64) {
    let body: serde_json::Value = serde_json::from_slice(&record.payload).expect("json payload");
    let seq = body["seq"].as_u64().expect("seq");
    assert_eq!(
        body["key"].as_str(),
        Some(record.key.as_str()),
        "key = aggregate id"
    );
    (record.key.clone(), seq)
}

fn keys_of(records: &[PendingRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.key.clone()).collect()
}

/// Per key, the sequence numbers in the order given.
fn sequences<'a>(pairs: impl IntoIterator<Item = &'a (String, u64)>) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, seq) in pairs {
        out.entry(key.clone()).or_default().push(*seq);
    }
    out
}

/// Asserts that every aggregate in `expected` (key → event count) was
/// published exactly once per event, in creation order.
pub(crate) fn assert_in_order(name: &str, log: &[(String, u64)], expected: &BTreeMap<String, u64>) {
    let seqs = sequences(log);
    let keys: BTreeSet<&String> = seqs.keys().collect();
    let expected_keys: BTreeSet<&String> = expected.keys().collect();
    assert_eq!(keys, expected_keys, "{name}: the aggregates published");
    for (key, n) in expected {
        let want: Vec<u64> = (0..*n).collect();
        assert_eq!(
            seqs[key], want,
            "{name}: {key} once per event, in creation order"
        );
    }
}

/// Claims and publishes everything, `max` at a time, until a claim comes
/// back empty; returns the records in publish order.
async fn drain<S: OutboxStore>(outbox: &S, max: usize) -> Vec<PendingRecord> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let batch = outbox.claim(max).await.expect("claim");
        if batch.records().is_empty() {
            batch.commit(&[]).await.expect("release");
            return out;
        }
        assert!(batch.records().len() <= max, "a batch holds at most max");
        let ids: Vec<i64> = batch.records().iter().map(|r| r.id).collect();
        out.extend(batch.records().iter().cloned());
        batch.commit(&ids).await.expect("commit");
    }
    panic!("the outbox never ran dry");
}

/// Asserts that `records` hold, per aggregate, consecutive rows starting at
/// `next[key]` (the aggregate's first unpublished row), and advances `next`.
fn assert_prefixes(name: &str, records: &[(String, u64)], next: &mut HashMap<String, u64>) {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for (key, seq) in records {
        let expected = *seen
            .get(key.as_str())
            .unwrap_or(next.get(key).unwrap_or(&0));
        assert_eq!(
            *seq, expected,
            "{name}: {key} claimed from its first unpublished row, in order"
        );
        seen.insert(key, seq + 1);
    }
}

// ---------------------------------------------------------------- outbox --

/// Guarantee 1: committed rows are claimed, rolled-back ones never.
pub async fn publish_iff_commit<H: Harness>(h: H) {
    let committed = vec![Rec::new(TOPIC, "a", 0), Rec::new(TOPIC, "a", 1)];
    enqueue_committed(&h, &committed).await;
    let rolled_back = Rec::new(TOPIC, "b", 0);
    let mut tx = h.begin().await;
    H::enqueue(&mut tx, std::slice::from_ref(&rolled_back))
        .await
        .expect("enqueue");
    H::rollback(tx).await;
    let later = Rec::new("conformance.other", "c", 0);
    enqueue_committed(&h, std::slice::from_ref(&later)).await;

    let published = drain(&h.outbox(AfterPublish::MarkPublished), 100).await;
    let ids: BTreeSet<Uuid> = published.iter().map(|r| r.event_id).collect();
    let want: BTreeSet<Uuid> = [
        committed[0].event_id(),
        committed[1].event_id(),
        later.event_id(),
    ]
    .into_iter()
    .collect();
    assert_eq!(ids, want, "{}: exactly the committed events", H::NAME);
    assert!(!ids.contains(&rolled_back.event_id()));

    // The record carries what the relay writes to Kafka.
    let c = published
        .iter()
        .find(|r| r.event_id == later.event_id())
        .expect("c");
    assert_eq!(c.topic, "conformance.other");
    assert_eq!(c.key, "c");
    let headers: BTreeMap<&str, &str> = c
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        headers.get("event_id").copied(),
        Some(&*later.event_id().to_string())
    );
    assert_eq!(headers.get("event_type"), Some(&"Step"));
    assert_eq!(headers.get("ce_subject"), Some(&"c"));
    let body: wire::Body = serde_json::from_slice(&c.payload).expect("payload");
    assert_eq!(body.event_id, later.event_id());

    assert_eq!(h.status().await.backlog, 0, "{}: nothing left", H::NAME);
    assert!(drain(&h.outbox(AfterPublish::MarkPublished), 100)
        .await
        .is_empty());
}

/// The JSON body as a consumer would read it.
mod wire {
    #[derive(serde::Deserialize)]
    pub struct Body {
        pub event_id: uuid::Uuid,
    }
}

/// Guarantee 4: small batches cut through aggregates, yet each aggregate's
/// events come out in creation order, each once.
pub async fn claims_keep_aggregate_order<H: Harness>(h: H) {
    const AGGREGATES: u64 = 5;
    const EVENTS: u64 = 8;
    let mut all = Vec::new();
    for seq in 0..EVENTS {
        for a in 0..AGGREGATES {
            all.push(Rec::new(TOPIC, &format!("agg-{a}"), seq));
        }
    }
    // Transactions of 1, 2 or 3 records, mixing aggregates.
    let mut rest = &all[..];
    let mut size = 1;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        enqueue_committed(&h, &rest[..n]).await;
        rest = &rest[n..];
        size = size % 3 + 1;
    }
    // One transaction with several events of one aggregate, in order.
    let burst: Vec<Rec> = (0..4).map(|seq| Rec::new(TOPIC, "burst", seq)).collect();
    enqueue_committed(&h, &burst).await;

    let published = drain(&h.outbox(AfterPublish::MarkPublished), 3).await;
    let log: Vec<(String, u64)> = published.iter().map(key_seq).collect();
    let mut expected: BTreeMap<String, u64> = (0..AGGREGATES)
        .map(|a| (format!("agg-{a}"), EVENTS))
        .collect();
    expected.insert("burst".to_owned(), 4);
    assert_in_order(H::NAME, &log, &expected);
}

/// The relay's failure path: only an acknowledged prefix of each aggregate
/// is committed; the rest is released (as is a dropped batch) and comes
/// back, in order, on the next pass.
pub async fn a_partial_commit_releases_the_rest_in_order<H: Harness>(h: H) {
    for seq in 0..4 {
        enqueue_committed(&h, &[Rec::new(TOPIC, "x", seq)]).await;
    }
    for seq in 0..3 {
        enqueue_committed(&h, &[Rec::new(TOPIC, "y", seq)]).await;
    }
    let outbox = h.outbox(AfterPublish::MarkPublished);

    // A dropped batch (a relay that died mid-pass) releases everything.
    let dropped = outbox.claim(100).await.expect("claim");
    let first_pass: Vec<i64> = dropped.records().iter().map(|r| r.id).collect();
    assert_eq!(first_pass.len(), 7);
    drop(dropped);
    // PostgreSQL rolls a dropped transaction back when its connection is
    // next used, so the rows come back soon rather than at once: wait for
    // them, within a bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = outbox.claim(100).await.expect("claim again");
        let second_pass: Vec<i64> = again.records().iter().map(|r| r.id).collect();
        again.commit(&[]).await.expect("release");
        if second_pass == first_pass {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: released rows never came back: {second_pass:?} vs {first_pass:?}",
            H::NAME
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut log = Vec::new();
    let mut next = HashMap::new();
    for pass in 0..10 {
        let batch = outbox.claim(100).await.expect("claim");
        if batch.records().is_empty() {
            batch.commit(&[]).await.expect("release");
            break;
        }
        let claimed: Vec<(String, u64)> = batch.records().iter().map(key_seq).collect();
        assert_prefixes(H::NAME, &claimed, &mut next.clone());
        // Publish only the first record of each aggregate.
        let mut seen = HashSet::new();
        let mut published = Vec::new();
        for (record, ks) in batch.records().iter().zip(&claimed) {
            if seen.insert(record.key.clone()) {
                published.push(record.id);
                log.push(ks.clone());
                next.insert(ks.0.clone(), ks.1 + 1);
            }
        }
        batch.commit(&published).await.expect("commit");
        let expected_backlog = 7 - log.len() as i64;
        assert_eq!(
            h.status().await.backlog,
            expected_backlog,
            "{}: pass {pass} published one per aggregate",
            H::NAME
        );
    }
    let expected: BTreeMap<String, u64> = [("x".to_owned(), 4), ("y".to_owned(), 3)].into();
    assert_in_order(H::NAME, &log, &expected);
}

/// Guarantee 4 with two relays: while one holds an aggregate's head, the
/// other never gets any row of that aggregate. PostgreSQL skips the locked
/// aggregate; SQLite's second claim waits until the first batch committed.
/// Either way the second batch starts each aggregate at its first
/// unpublished row.
pub async fn a_second_claimer_never_gets_a_claimed_aggregate<H: Harness>(h: H) {
    for seq in 0..4 {
        enqueue_committed(&h, &[Rec::new(TOPIC, "agg-x", seq)]).await;
    }
    for seq in 0..2 {
        enqueue_committed(&h, &[Rec::new(TOPIC, "agg-y", seq)]).await;
    }
    let mut outboxes = h.outboxes(2, AfterPublish::MarkPublished);
    let second = outboxes.pop().expect("second");
    let first = outboxes.pop().expect("first");

    let a = first.claim(1).await.expect("claim A");
    let a_records: Vec<(String, u64)> = a.records().iter().map(key_seq).collect();
    assert_eq!(
        a_records,
        vec![("agg-x".to_owned(), 0)],
        "{}: the oldest head",
        H::NAME
    );
    let a_keys = keys_of(a.records());

    // Set before A starts to commit: B may hold A's aggregates only if it
    // returned after this.
    let a_committing = Arc::new(AtomicBool::new(false));
    let b_task = {
        let a_committing = Arc::clone(&a_committing);
        tokio::spawn(async move {
            let b = second.claim(100).await.expect("claim B");
            let after_a = a_committing.load(Ordering::SeqCst);
            (b, after_a)
        })
    };
    let a_published = vec![a.records()[0].id];
    let (b, b_after_a) = if H::CLAIMS_SERIALIZED {
        // B should be waiting for A. Give it a moment to prove otherwise (a
        // B that returns now must not hold agg-x); the checks below are
        // right whichever way this goes, the moment only makes a broken
        // store likelier to be caught.
        let mut b_task = b_task;
        let early = tokio::time::timeout(Duration::from_millis(300), &mut b_task).await;
        a_committing.store(true, Ordering::SeqCst);
        a.commit(&a_published).await.expect("commit A");
        match early {
            Ok(b) => b.expect("B"),
            Err(_) => b_task.await.expect("B"),
        }
    } else {
        // B must come back while A still holds its aggregate.
        let b = b_task.await.expect("B");
        a_committing.store(true, Ordering::SeqCst);
        a.commit(&a_published).await.expect("commit A");
        b
    };
    let mut log = a_records.clone();
    let b_records: Vec<(String, u64)> = b.records().iter().map(key_seq).collect();
    for key in keys_of(b.records()).intersection(&a_keys) {
        assert!(
            b_after_a,
            "{}: the second claimer got {key} while the first held it: {b_records:?}",
            H::NAME
        );
    }
    let mut next: HashMap<String, u64> = [("agg-x".to_owned(), 1)].into();
    assert_prefixes(H::NAME, &b_records, &mut next);
    if H::CLAIMS_SERIALIZED {
        assert!(
            b_records.contains(&("agg-x".to_owned(), 1)),
            "{}: the serialized claim waited for A and continues agg-x: {b_records:?}",
            H::NAME
        );
    }
    let b_ids: Vec<i64> = b.records().iter().map(|r| r.id).collect();
    log.extend(b_records);
    b.commit(&b_ids).await.expect("commit B");

    log.extend(drain(&first, 100).await.iter().map(key_seq));
    let expected: BTreeMap<String, u64> = [("agg-x".to_owned(), 4), ("agg-y".to_owned(), 2)].into();
    assert_in_order(H::NAME, &log, &expected);
}

/// Guarantees 1 and 4 under load: writers commit while four claimers run,
/// deliveries fail at random (only an acknowledged prefix per aggregate is
/// committed). No two batches ever hold one aggregate at once, and every
/// aggregate comes out complete and in creation order.
pub async fn concurrent_claimers_keep_order_and_disjoint_aggregates<H: Harness>(h: H) {
    const CLAIMERS: usize = 4;
    const WRITERS: usize = 3;
    const AGGREGATES_PER_WRITER: usize = 4;
    const EVENTS: u64 = 15;
    let h = Arc::new(h);
    let held: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let log: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let writers_left = Arc::new(AtomicUsize::new(WRITERS));
    let deadline = Instant::now() + Duration::from_secs(120);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let h = Arc::clone(&h);
        let writers_left = Arc::clone(&writers_left);
        writers.push(tokio::spawn(async move {
            // Each writer owns its aggregates: their creation order is the
            // order of its commits.
            for seq in 0..EVENTS {
                for a in 0..AGGREGATES_PER_WRITER {
                    enqueue_committed(&*h, &[Rec::new(TOPIC, &format!("w{w}-a{a}"), seq)]).await;
                }
            }
            writers_left.fetch_sub(1, Ordering::SeqCst);
        }));
    }

    let mut claimers = Vec::new();
    for (c, outbox) in h
        .outboxes(CLAIMERS, AfterPublish::MarkPublished)
        .into_iter()
        .enumerate()
    {
        let h = Arc::clone(&h);
        let held = Arc::clone(&held);
        let log = Arc::clone(&log);
        let writers_left = Arc::clone(&writers_left);
        claimers.push(tokio::spawn(async move {
            loop {
                assert!(Instant::now() < deadline, "claimer {c}: outbox not drained");
                let writing = writers_left.load(Ordering::SeqCst) > 0;
                let batch = outbox.claim(5).await.expect("claim");
                if batch.records().is_empty() {
                    batch.commit(&[]).await.expect("release");
                    if !writing && h.status().await.backlog == 0 {
                        return;
                    }
                    outbox.wait_for_work(Duration::from_millis(20)).await;
                    continue;
                }
                let keys = keys_of(batch.records());
                {
                    let mut held = held.lock().expect("held");
                    for key in &keys {
                        if let Some(other) = held.insert(key.clone(), c) {
                            panic!("claimer {c} got {key} while claimer {other} held it");
                        }
                    }
                }
                let mut published = Vec::new();
                {
                    // "Publish": per aggregate, an acknowledged prefix.
                    let mut rng = rand::thread_rng();
                    let mut blocked = HashSet::new();
                    let mut log = log.lock().expect("log");
                    for record in batch.records() {
                        if blocked.contains(&record.key) {
                            continue;
                        }
                        if rng.gen_bool(0.15) {
                            blocked.insert(record.key.clone());
                            continue;
                        }
                        published.push(record.id);
                        log.push(key_seq(record));
                    }
                }
                {
                    // Released before the commit ends the batch's hold, so a
                    // later claimer finding them is never a false alarm.
                    let mut held = held.lock().expect("held");
                    for key in &keys {
                        held.remove(key);
                    }
                }
                batch.commit(&published).await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    for c in claimers {
        c.await.expect("claimer");
    }
    let log = log.lock().expect("log").clone();
    let expected: BTreeMap<String, u64> = (0..WRITERS)
        .flat_map(|w| (0..AGGREGATES_PER_WRITER).map(move |a| (format!("w{w}-a{a}"), EVENTS)))
        .collect();
    assert_in_order(H::NAME, &log, &expected);
}

/// Guarantee 1 with a transaction still open: its rows are not claimed,
/// nothing waits on it, and once it commits a later pass finds them in
/// order. A rolled-back transaction leaves a gap that loses nothing.
pub async fn a_late_commit_is_found_on_a_later_pass<H: Harness>(h: H) {
    let outbox = h.outbox(AfterPublish::MarkPublished);
    enqueue_committed(&h, &[Rec::new(TOPIC, "shared", 0)]).await;
    enqueue_committed(&h, &[Rec::new(TOPIC, "early", 0)]).await;
    let mut log: Vec<(String, u64)> = Vec::new();

    let mut open = h.begin().await;
    H::enqueue(
        &mut open,
        &[Rec::new(TOPIC, "shared", 1), Rec::new(TOPIC, "late", 0)],
    )
    .await
    .expect("enqueue");
    // While it is open, a pass sees only what committed.
    let batch = outbox.claim(100).await.expect("claim while open");
    // (Order across aggregates is the store's choice.)
    let seen: BTreeSet<(String, u64)> = batch.records().iter().map(key_seq).collect();
    assert_eq!(
        seen,
        [("early".to_owned(), 0), ("shared".to_owned(), 0)].into(),
        "{}: only committed rows",
        H::NAME
    );
    // Published after the open transaction ends: SQLite's single writer
    // would otherwise wait for it.
    let held_ids: Vec<i64> = batch.records().iter().map(|r| r.id).collect();
    batch.commit(&[]).await.expect("release");
    H::commit(open).await;

    let batch = outbox.claim(100).await.expect("claim after commit");
    let seen: Vec<(String, u64)> = batch.records().iter().map(key_seq).collect();
    let ids: Vec<i64> = batch.records().iter().map(|r| r.id).collect();
    assert!(
        held_ids.iter().all(|id| ids.contains(id)),
        "released rows return"
    );
    log.extend(seen);
    batch.commit(&ids).await.expect("commit");

    // A rolled-back event of the aggregate loses nothing and blocks nothing.
    let mut gone = h.begin().await;
    H::enqueue(&mut gone, &[Rec::new(TOPIC, "shared", 99)])
        .await
        .expect("enqueue");
    H::rollback(gone).await;
    enqueue_committed(&h, &[Rec::new(TOPIC, "shared", 2)]).await;
    log.extend(drain(&outbox, 100).await.iter().map(key_seq));

    let expected: BTreeMap<String, u64> = [
        ("shared".to_owned(), 3),
        ("early".to_owned(), 1),
        ("late".to_owned(), 1),
    ]
    .into();
    assert_in_order(H::NAME, &log, &expected);
}

/// `MarkPublished` keeps published rows for retention; `Delete` removes them
/// in the committing transaction, and only those.
pub async fn mark_published_keeps_rows_delete_removes_them<H: Harness>(h: H) {
    let marked: Vec<Rec> = (0..3).map(|s| Rec::new(TOPIC, "m", s)).collect();
    enqueue_committed(&h, &marked).await;
    assert_eq!(
        drain(&h.outbox(AfterPublish::MarkPublished), 100)
            .await
            .len(),
        3
    );
    assert_eq!(
        h.outbox_rows().await,
        3,
        "{}: marked rows are kept",
        H::NAME
    );
    let status = h.status().await;
    assert_eq!((status.backlog, status.published_retained), (0, 3));

    let deleting = h.outbox(AfterPublish::Delete);
    let deleted: Vec<Rec> = (0..2).map(|s| Rec::new(TOPIC, "d", s)).collect();
    enqueue_committed(&h, &deleted).await;
    assert_eq!(drain(&deleting, 100).await.len(), 2);
    assert_eq!(
        h.outbox_rows().await,
        3,
        "{}: published rows deleted",
        H::NAME
    );

    // Only the published ones go.
    let partial: Vec<Rec> = (0..2).map(|s| Rec::new(TOPIC, "e", s)).collect();
    enqueue_committed(&h, &partial).await;
    let batch = deleting.claim(100).await.expect("claim");
    assert_eq!(batch.records().len(), 2);
    let first = batch.records()[0].id;
    batch.commit(&[first]).await.expect("commit");
    assert_eq!(h.outbox_rows().await, 4);
    let status = h.status().await;
    assert_eq!((status.backlog, status.published_retained), (1, 3));
    let rest = drain(&deleting, 100).await;
    assert_eq!(
        rest.iter().map(key_seq).collect::<Vec<_>>(),
        vec![("e".to_owned(), 1)]
    );
    assert_eq!(h.outbox_rows().await, 3);
}

/// The backlog figures and the retention of published rows.
pub async fn status_backlog_and_retention<H: Harness>(h: H) {
    let empty = h.status().await;
    assert_eq!(
        (
            empty.backlog,
            empty.oldest_unpublished_at,
            empty.published_retained
        ),
        (0, None, 0),
        "{}: an empty outbox",
        H::NAME
    );
    let before = chrono::Utc::now();
    enqueue_committed(&h, &[Rec::new(TOPIC, "p", 0)]).await;
    enqueue_committed(&h, &[Rec::new(TOPIC, "q", 0)]).await;
    let status = h.status().await;
    assert_eq!(status.backlog, 2);
    let oldest = status.oldest_unpublished_at.expect("oldest");
    // A sanity bound on the stored time (catches time-zone or format slips),
    // not a timing assertion.
    assert!(
        (oldest - before).num_seconds().abs() < 60,
        "{}: oldest {oldest} vs {before}",
        H::NAME
    );

    let outbox = h.outbox(AfterPublish::MarkPublished);
    let batch = outbox.claim(100).await.expect("claim");
    let first = batch.records()[0].id;
    batch.commit(&[first]).await.expect("commit");
    let status = h.status().await;
    assert_eq!((status.backlog, status.published_retained), (1, 1));
    assert!(status.oldest_unpublished_at.is_some());

    assert_eq!(
        h.purge_published(Duration::from_secs(3600), 100).await,
        0,
        "{}: younger than the retention",
        H::NAME
    );
    assert_eq!(h.purge_published(Duration::ZERO, 100).await, 1);
    let status = h.status().await;
    assert_eq!((status.backlog, status.published_retained), (1, 0));

    for s in 0..3 {
        enqueue_committed(&h, &[Rec::new(TOPIC, "r", s)]).await;
    }
    assert_eq!(drain(&outbox, 100).await.len(), 4);
    let status = h.status().await;
    assert_eq!(
        (
            status.backlog,
            status.oldest_unpublished_at,
            status.published_retained
        ),
        (0, None, 4)
    );
    // At most `limit` per call.
    assert_eq!(h.purge_published(Duration::ZERO, 3).await, 3);
    assert_eq!(h.purge_published(Duration::ZERO, 3).await, 1);
    assert_eq!(h.status().await.published_retained, 0);
    assert_eq!(h.outbox_rows().await, 0);
}

// ----------------------------------------------------------------- inbox --

/// Guarantee 2: a redelivered event has one effect per group.
pub async fn an_inbox_duplicate_has_one_effect<H: Harness>(h: H) {
    h.create_effects_table().await;
    let inbox = h.inbox("projection");
    assert_eq!(inbox.group(), "projection");
    let event_id = Uuid::new_v4();
    async fn apply<H: Harness>(
        inbox: &H::Inbox,
        event_id: Uuid,
        by: &'static str,
    ) -> Result<Applied, HandlerError> {
        inbox
            .apply(event_id, async move |conn| {
                H::insert_effect(conn, event_id, by).await
            })
            .await
    }
    assert_eq!(
        apply::<H>(&inbox, event_id, "first").await.expect("first"),
        Applied::Now
    );
    assert_eq!(
        apply::<H>(&inbox, event_id, "again").await.expect("again"),
        Applied::AlreadyProcessed,
        "{}: the duplicate is skipped",
        H::NAME
    );
    assert_eq!(
        h.effects(Some(event_id)).await,
        1,
        "{}: one effect",
        H::NAME
    );
    assert!(inbox.contains(event_id).await.expect("contains"));
    assert!(!inbox.contains(Uuid::new_v4()).await.expect("contains"));

    // Another group applies it once too.
    let other = h.inbox("notifications");
    assert_eq!(
        apply::<H>(&other, event_id, "other").await.expect("other"),
        Applied::Now
    );
    assert_eq!(
        apply::<H>(&other, event_id, "other again")
            .await
            .expect("other"),
        Applied::AlreadyProcessed
    );
    assert_eq!(h.effects(Some(event_id)).await, 2);

    // Retention.
    assert_eq!(h.purge_processed(Duration::from_secs(3600), 100).await, 0);
    assert_eq!(
        h.purge_processed(Duration::ZERO, 1).await,
        1,
        "at most the limit"
    );
    assert_eq!(h.purge_processed(Duration::ZERO, 100).await, 1);
    assert!(!inbox.contains(event_id).await.expect("contains"));
}

/// Guarantee 2's other half: effects that fail roll back with the inbox row,
/// so the retry runs them (once).
pub async fn failed_effects_roll_back_the_inbox_row<H: Harness>(h: H) {
    h.create_effects_table().await;
    let inbox = h.inbox("projection");
    let event_id = Uuid::new_v4();
    let error = inbox
        .apply(event_id, async move |conn| {
            // The effect is written, then the handler fails.
            H::insert_effect(conn, event_id, "doomed").await?;
            Err(HandlerError::transient("downstream unavailable"))
        })
        .await
        .expect_err("fails");
    assert!(error.is_transient(), "the handler's own error comes back");
    assert_eq!(
        h.effects(Some(event_id)).await,
        0,
        "{}: effect rolled back",
        H::NAME
    );
    assert!(
        !inbox.contains(event_id).await.expect("contains"),
        "{}: no inbox row",
        H::NAME
    );

    let error = inbox
        .apply(event_id, async |_conn| {
            Err(HandlerError::permanent("bad data"))
        })
        .await
        .expect_err("fails");
    assert!(!error.is_transient());
    assert!(!inbox.contains(event_id).await.expect("contains"));

    let applied = inbox
        .apply(event_id, async move |conn| {
            H::insert_effect(conn, event_id, "retry").await
        })
        .await
        .expect("retry");
    assert_eq!(applied, Applied::Now);
    assert_eq!(h.effects(Some(event_id)).await, 1);
    assert!(inbox.contains(event_id).await.expect("contains"));
}

/// Guarantee 2 under concurrency: two consumers of one group get every event
/// at the same time; each event has exactly one effect.
pub async fn concurrent_deliveries_have_one_effect<H: Harness>(h: H) {
    const EVENTS: usize = 100;
    h.create_effects_table().await;
    let a = Arc::new(h.inbox("projection"));
    let b = Arc::new(h.inbox("projection"));
    let events: Vec<Uuid> = (0..EVENTS).map(|_| Uuid::new_v4()).collect();
    let mut tasks = Vec::new();
    for id in &events {
        for (inbox, by) in [(Arc::clone(&a), "a"), (Arc::clone(&b), "b")] {
            let id = *id;
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    let result = inbox
                        .apply(id, async move |conn| {
                            H::insert_effect(conn, id, by).await?;
                            // Keep the transaction open a moment so the two
                            // deliveries overlap (no assertion depends on
                            // it).
                            tokio::task::yield_now().await;
                            Ok(())
                        })
                        .await;
                    match result {
                        Ok(applied) => return applied,
                        // Deadlocks and busy files are transient: the
                        // runtime would retry, so do we.
                        Err(e) if e.is_transient() => continue,
                        Err(e) => panic!("permanent failure: {e}"),
                    }
                }
                panic!("delivery of {id} kept failing");
            }));
        }
    }
    let mut now = 0;
    for t in tasks {
        if t.await.expect("task") == Applied::Now {
            now += 1;
        }
    }
    assert_eq!(
        now,
        EVENTS,
        "{}: one delivery of each event applied",
        H::NAME
    );
    assert_eq!(
        h.effects(None).await,
        EVENTS as i64,
        "{}: one effect per event",
        H::NAME
    );
}
