//! Foundation smoke test: the store's migrations on a fresh database of the
//! real PostgreSQL server, and a row round-trip through sqlx.

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

    let row = sqlx::query(
        "SELECT event_id, payload, aggregate_seq, published_at IS NULL AS pending
         FROM herald_outbox",
    )
    .fetch_one(&pool)
    .await
    .expect("select");
    assert_eq!(row.get::<uuid::Uuid, _>("event_id"), event_id);
    assert_eq!(row.get::<Vec<u8>, _>("payload"), payload);
    assert_eq!(row.get::<i64, _>("aggregate_seq"), 1);
    assert!(row.get::<bool, _>("pending"));

    pool.close().await;
}

/// A database migrated by an earlier version, with a row marked in place: the
/// migration that gives published rows their own table moves it there, and
/// leaves the unpublished row where the relay looks.
#[tokio::test]
async fn rows_marked_in_place_move_to_the_published_table() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;
    let moving = 20261127000005;
    let mut earlier = sqlx::migrate::Migrator {
        migrations: herald_postgres::MIGRATOR
            .iter()
            .filter(|m| m.version < moving)
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
    let left: Vec<i64> = sqlx::query_scalar("SELECT aggregate_seq FROM herald_outbox")
        .fetch_all(&pool)
        .await
        .expect("outbox");
    assert_eq!(left, vec![2], "the unpublished row stays");
    let moved: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT aggregate_seq, payload FROM herald_outbox_published")
            .fetch_all(&pool)
            .await
            .expect("published");
    assert_eq!(moved, vec![(1, vec![1u8])], "the marked row moved whole");
    pool.close().await;
}
