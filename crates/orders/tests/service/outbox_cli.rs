//! `orders outbox status|retry|discard|history` on a parked event: status
//! shows it, retry and discard end the park and are recorded with who and
//! why, and naming an event that is not parked is an error.

use std::process::{Command, Output};

use uuid::Uuid;

fn orders(db: &herald_test::TestDatabase, kafka: &herald_test::Kafka, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orders"))
        .args(args)
        .env("KAFKA_BROKERS", kafka.brokers())
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("orders")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Enqueues one event and parks it as a relay would after a refusal.
async fn parked_event(pool: &sqlx::PgPool) -> Uuid {
    let event = herald_test::events::step("order-1", 0);
    let record =
        herald_postgres::OutboxRecord::new("order-events", &event, "/tests", None).expect("record");
    let event_id = record.envelope.event_id;
    let mut tx = pool.begin().await.expect("begin");
    herald_postgres::outbox::enqueue_all(&mut tx, &[record])
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let id: i64 = sqlx::query_scalar("SELECT id FROM herald_outbox WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(pool)
        .await
        .expect("id");
    let parked = herald_postgres::refusals::record(pool, id, "Broker: Message size too large", 1)
        .await
        .expect("refusal");
    assert!(parked);
    event_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commands_show_retry_discard_and_audit_parked_events() {
    let (Some(kafka), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;
    orders::store::postgres::migrate(&pool)
        .await
        .expect("migrate");
    let (first, second) = (parked_event(&pool).await, parked_event(&pool).await);

    let status = orders(&db, &kafka, &["outbox", "status"]);
    assert!(status.status.success(), "{}", text(&status));
    let shown = text(&status);
    assert!(
        shown.contains("refused by the broker: 2 (2 parked"),
        "{shown}"
    );
    assert!(
        shown.contains(&first.to_string()) && shown.contains("PARKED"),
        "{shown}"
    );

    let retried = orders(
        &db,
        &kafka,
        &[
            "outbox",
            "retry",
            "--event-id",
            &first.to_string(),
            "--reason",
            "topic limit raised",
            "--actor",
            "ops-1",
        ],
    );
    assert!(retried.status.success(), "{}", text(&retried));
    let queued: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM herald_outbox_pending p JOIN herald_outbox o ON o.id = p.id WHERE o.event_id = $1)")
            .bind(first)
            .fetch_one(&pool)
            .await
            .expect("pending");
    assert!(queued, "a retried event is queued again");

    let discarded = orders(
        &db,
        &kafka,
        &[
            "outbox",
            "discard",
            "--event-id",
            &second.to_string(),
            "--reason",
            "never valid",
        ],
    );
    assert!(discarded.status.success(), "{}", text(&discarded));
    let again = orders(
        &db,
        &kafka,
        &[
            "outbox",
            "discard",
            "--event-id",
            &second.to_string(),
            "--reason",
            "twice",
        ],
    );
    assert!(
        !again.status.success(),
        "an event no longer parked: an error"
    );
    assert!(text(&again).contains("not parked"), "{}", text(&again));

    let history = orders(&db, &kafka, &["outbox", "history"]);
    assert!(history.status.success(), "{}", text(&history));
    let lines = text(&history);
    assert!(
        lines.contains(&format!("retry {first} by ops-1: topic limit raised")),
        "{lines}"
    );
    assert!(lines.contains(&format!("discard {second} by ")), "{lines}");
    let status = text(&orders(&db, &kafka, &["outbox", "status"]));
    assert!(
        status.contains("refused by the broker: 0 (0 parked"),
        "{status}"
    );
}
