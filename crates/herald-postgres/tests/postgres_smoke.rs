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
    migrate_before_the_queue(&pool).await;
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

/// sqlx is built with TLS (rustls): `sslmode=require` on the `--secure`
/// server (`ssl = on`) makes an encrypted connection.
#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let (Some(_), Some(postgres)) = (herald_test::secure(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let url = format!("{}?sslmode=require", db.url());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await
        .expect("sslmode=require on a server with ssl on");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection is encrypted");
    pool.close().await;
}

/// The migrations before the relay's queue, as an earlier version ran them.
async fn migrate_before_the_queue(pool: &sqlx::PgPool) {
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
    earlier.run(pool).await.expect("earlier migrations");
}

/// The queue's migration started while a writer of the earlier version
/// holds its insert open (issue #20, scenario 8): the migration waits for
/// the writer's commit, and the writer's event is queued, not lost.
#[tokio::test]
async fn an_insert_in_flight_across_the_queue_migration_is_queued() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;
    migrate_before_the_queue(&pool).await;
    let mut writer = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO herald_outbox
             (event_id, aggregate_type, aggregate_id, aggregate_seq, event_type, topic, record_key,
              payload, occurred_at)
         VALUES (gen_random_uuid(), 'smoke', 'a-1', 1, 'Smoke', 't', 'a-1', '\\x07', now())",
    )
    .execute(&mut *writer)
    .await
    .expect("the earlier version's insert");

    let migrating = tokio::spawn({
        let pool = pool.clone();
        async move { herald_postgres::migrate(&pool).await }
    });
    // The migration waits on the writer's lock on the outbox.
    herald_test::poll_until(
        "the migration waiting for the open insert",
        std::time::Duration::from_secs(30),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                 WHERE c.relname = 'herald_outbox' AND NOT l.granted
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
            if waiting > 0 {
                Ok(())
            } else {
                Err("no waiting lock".to_owned())
            }
        },
    )
    .await;
    assert!(
        !migrating.is_finished(),
        "the migration waits for the writer"
    );
    writer.commit().await.expect("the writer commits");
    migrating
        .await
        .expect("migration task")
        .expect("the migration");

    let status = herald_postgres::outbox::status(&pool)
        .await
        .expect("status");
    assert_eq!(status.backlog, 1, "the in-flight event is queued");
    let store = herald_postgres::PgOutbox::new(pool.clone());
    let batch = store.claim(10).await.expect("claim");
    let payloads: Vec<&[u8]> = batch
        .records()
        .iter()
        .map(|r| r.payload.as_slice())
        .collect();
    assert_eq!(payloads, vec![&[7u8][..]]);
    batch.commit(&[]).await.expect("release");
    pool.close().await;
}

/// A database that applied the queue migration's earlier text (before its
/// LOCK) keeps working: migrate accepts that text's checksum instead of
/// refusing the migration as modified.
#[tokio::test]
async fn a_database_migrated_with_the_earlier_queue_migration_still_migrates() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let pool = db.pool().await;
    herald_postgres::migrate(&pool).await.expect("migrations");
    // What a database migrated by an earlier build records.
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 20261127000004",
    )
    .bind("6d4ae486a697dd0f9ef2fc276559460d53b3b16de1a98de4cfd0c6bbc4b439be4a32b9ef14f5f19ccff91b7e0182ee32")
    .execute(&pool)
    .await
    .expect("the earlier checksum");
    // On a connection of its own: sqlx keeps its migration lock when it
    // refuses, until the session ends.
    let mut alone = sqlx::ConnectOptions::connect(&db.options())
        .await
        .expect("connect");
    assert!(
        herald_postgres::MIGRATOR.run(&mut alone).await.is_err(),
        "sqlx alone refuses a migration whose text changed"
    );
    sqlx::Connection::close(alone).await.expect("close");
    herald_postgres::migrate(&pool)
        .await
        .expect("migrate accepts the earlier text");
    pool.close().await;
}
