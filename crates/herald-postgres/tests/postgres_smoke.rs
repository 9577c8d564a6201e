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
