//! The database goes away while the relay runs (every connection cut and new
//! ones refused, through a proxy, as in a PostgreSQL restart); the relay
//! recovers by itself and nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use herald::Event;
use herald_kafka::{Relay, RelayConfig};
use herald_postgres::PgOutbox;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_recovers_from_a_database_outage() {
    let Some(env) = env(3).await else {
        return;
    };
    let options = env.db.options();
    let proxy =
        herald_test::FaultProxy::start(&format!("{}:{}", options.get_host(), options.get_port()));
    let relay_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&env.db.url_via(proxy.address()))
        .await
        .expect("relay pool through the proxy");
    let relay = Relay::new(
        PgOutbox::new(relay_pool),
        publisher(&env.kafka),
        RelayConfig {
            batch_size: 50,
            poll_interval: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            workers: 2,
        },
    );
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone().cancelled_owned()));

    let mut committed = BTreeSet::new();
    for round in 0..3u64 {
        for i in 0..300u64 {
            let event = step(&format!("agg-{}", i % 31), round * 1000 + i);
            enqueue_committed(&env.pool, env.topic.name(), &event).await;
            committed.insert(event.event_id());
            if i == 150 {
                // The outage, in the middle of the stream.
                proxy.cut();
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.restore();
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while herald_postgres::outbox::status(&env.pool)
        .await
        .expect("status")
        .backlog
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "relay did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await.expect("relay stopped");

    let reads = read_to_end(&env.kafka, env.topic.name(), 3);
    let seen: BTreeSet<_> = reads.iter().map(|r| r.event_id).collect();
    assert_eq!(seen, committed, "nothing lost across the outages");
    assert!(
        stats.store_failures() > 0,
        "the outages were felt by the relay"
    );
}
