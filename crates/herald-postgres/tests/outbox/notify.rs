//! LISTEN/NOTIFY: an idle relay wakes on a commit instead of waiting for its
//! poll interval, again and again.

use std::time::Duration;

use herald_kafka::{Relay, RelayConfig};
use herald_postgres::PgOutbox;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_wakes_on_each_commit() {
    let Some(env) = env(1).await else {
        return;
    };
    // A poll interval far longer than the test's patience: only a
    // notification can explain a prompt publish.
    let relay = Relay::new(
        PgOutbox::new(env.pool.clone()),
        publisher(&env.kafka),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..RelayConfig::default()
        },
    );
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone().cancelled_owned()));
    for round in 1..=3u64 {
        // Let the relay go idle (no backlog, waiting on LISTEN).
        tokio::time::sleep(Duration::from_millis(300)).await;
        enqueue_committed(&env.pool, env.topic.name(), &step("notified", round)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while stats.published() < round {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the relay did not wake"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.cancel();
    running.await.expect("relay stopped");
}
