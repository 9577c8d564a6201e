//! Foundation smoke test: the store's migrations on a fresh database of the
//! real PostgreSQL server, and a row round-trip through sqlx.

use herald::{OutboxBatch as _, OutboxStore as _};
use sqlx::Row;

#[tokio::test]
async fn migrations_apply_on_a_fresh_database_and_a_row_round_trips() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;

    herald_postgres::migrate(&pool).await.expect("migrations");
    // A second run is a no-op, as at every service start.
    herald_postgres::migrate(&pool)
        .await
        .expect("migrations again");

    let event_id = uuid::Uuid::new_v4();
    let payload = br#"{"event_type":"Smoke"}"#.to_vec();
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO herald_outbox
             (event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic, record_key, payload, occurred_at)
         VALUES ($1, 'smoke', 'a-1', 1, 'Smoke', 'smoke-topic', 'a-1', $2, now())",
    )
    .bind(event_id)
    .bind(&payload)
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.commit().await.expect("commit");

    let row = sqlx::query("SELECT event_id, payload, aggregate_seq FROM herald_outbox")
        .fetch_one(&pool)
        .await
        .expect("select");
    assert_eq!(row.get::<uuid::Uuid, _>("event_id"), event_id);
    assert_eq!(row.get::<Vec<u8>, _>("payload"), payload);
    assert_eq!(row.get::<i64, _>("aggregate_seq"), 1);

    pool.close().await;
}

/// A database migrated by an earlier version, with one event it marked
/// published in place and one it had not published: the migration that
/// gives the relay its queue queues only the second, and both stay in the
/// outbox.
#[tokio::test]
async fn events_an_earlier_version_left_unpublished_are_queued() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;
    let queue = 20261127000004;
    let mut earlier = sqlx::migrate::Migrator {
        migrations: herald_postgres::MIGRATOR
            .iter()
            .filter(|m| m.version < queue)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    earlier.set_ignore_missing(true);
    earlier.run(&pool).await.expect("earlier migrations");
    sqlx::query(
        "INSERT INTO herald_outbox
             (event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic, record_key,
              payload, occurred_at, published_at)
         VALUES (gen_random_uuid(), 'smoke', 'a-1', 1, 'Smoke', 't', 'a-1', '\\x01', now(), now()),
                (gen_random_uuid(), 'smoke', 'a-1', 2, 'Smoke', 't', 'a-1', '\\x02', now(), NULL)",
    )
    .execute(&pool)
    .await
    .expect("rows of the earlier schema");

    herald_postgres::migrate(&pool).await.expect("the rest");
    let status = herald_postgres::outbox::status(&pool)
        .await
        .expect("status");
    assert_eq!((status.backlog, status.published_retained), (1, 1));
    let store = herald_postgres::PgOutbox::new(pool.clone());
    let batch = store.claim(10).await.expect("claim");
    let payloads: Vec<&[u8]> = batch
        .records()
        .iter()
        .map(|r| r.payload.as_slice())
        .collect();
    assert_eq!(payloads, vec![&[2u8][..]], "only the unpublished event");
    batch.commit(&[]).await.expect("release");
    pool.close().await;
}

/// sqlx is built with TLS (rustls): `sslmode=require` gets as far as asking
/// the server for TLS. The test server has none, so the connection is
/// refused for that reason, not because the client cannot speak TLS.
#[tokio::test]
async fn sslmode_require_asks_the_server_for_tls() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let url = format!("{}?sslmode=require", db.url());
    let error = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await
        .expect_err("the test server has no TLS");
    let text = error.to_string();
    assert!(!text.contains("without TLS support"), "{text}");
    assert!(text.contains("TLS"), "{text}");
}
