//! Consumer-group churn for your own consumer: a [`GhostMember`] joins the
//! group, takes its share of the partitions away from your members, holds
//! them without reading or committing anything, and gives them back when
//! it leaves. Each join and each leave is a rebalance your consumer must
//! survive: its in-flight records finished or redone, its commits never
//! past what it handled, and no partition stalled after it comes back.
//!
//! A ghost that leaves hands its partitions back to the members that held
//! them (with one member, necessarily to that member), so a join and a
//! leave is "a partition revoked and given back to the same member".
//!
//! ```no_run
//! # async fn run(kafka: herald_test::Kafka) {
//! use std::time::Duration;
//! use herald_test::churn::GhostMember;
//!
//! // … your consumer runs in group "my-group" on "orders" …
//! let ghost = GhostMember::join(kafka.config(), "my-group", &["orders"]);
//! ghost.wait_assigned(Duration::from_secs(60)).await; // it holds partitions now
//! ghost.leave(); // and gives them back
//! # }
//! ```
//!
//! The ghost subscribes with the configuration you give it (brokers,
//! security). Members of one group must agree on the assignment protocol:
//! unless the configuration names a `partition.assignment.strategy`, the
//! ghost uses `cooperative-sticky`, herald's consumer runtime's default.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientConfig, ClientContext};

/// What the ghost's rebalance callbacks share with its handle.
struct GhostContext {
    assigned: Arc<AtomicUsize>,
}

impl ClientContext for GhostContext {}

impl ConsumerContext for GhostContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Held, never read: nothing fetched, nothing committed. (With
            // cooperative rebalancing `partitions` is what was added.)
            Rebalance::Assign(partitions) => {
                let _ = consumer.pause(partitions);
            }
            Rebalance::Revoke(_) | Rebalance::Error(_) => {}
        }
        let held = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.assigned.store(held, Ordering::SeqCst);
    }
}

/// A member of your consumer group that holds partitions and does nothing
/// with them, until [`GhostMember::leave`] (or drop).
pub struct GhostMember {
    assigned: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GhostMember {
    /// Joins `group` on `topics`; `config` gives the brokers and whatever
    /// else the cluster and the group need (the group id and the commit
    /// settings are the ghost's own). Panics when the consumer cannot be
    /// made or cannot subscribe: a fault test cannot go on without it.
    pub fn join(mut config: ClientConfig, group: &str, topics: &[&str]) -> GhostMember {
        if config.get("partition.assignment.strategy").is_none() {
            config.set("partition.assignment.strategy", "cooperative-sticky");
        }
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let assigned = Arc::new(AtomicUsize::new(0));
        let consumer: BaseConsumer<GhostContext> = config
            .create_with_context(GhostContext {
                assigned: Arc::clone(&assigned),
            })
            .expect("the ghost member's consumer");
        consumer
            .subscribe(topics)
            .expect("the ghost member subscribes");
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("herald-ghost-member".to_owned())
            .spawn(move || {
                // Polling serves the group protocol (heartbeats, rebalance
                // callbacks); its partitions are paused, so no record comes.
                while !thread_stop.load(Ordering::SeqCst) {
                    let _ = consumer.poll(Duration::from_millis(100));
                }
                // Leaves the group at once instead of after the session
                // time-out, so the partitions go back without delay.
                consumer.unsubscribe();
                drop(consumer);
            })
            .expect("the ghost member's thread");
        GhostMember {
            assigned,
            stop,
            thread: Some(thread),
        }
    }

    /// How many partitions it holds now.
    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::SeqCst)
    }

    /// Waits until it holds at least one partition: the group has
    /// rebalanced and your members gave some up. Panics after `limit`
    /// (a group with fewer partitions than members leaves a ghost none).
    pub async fn wait_assigned(&self, limit: Duration) {
        let start = Instant::now();
        while self.assigned() == 0 {
            assert!(
                start.elapsed() < limit,
                "the ghost member got no partition within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Leaves the group: its partitions go back to the other members.
    pub fn leave(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for GhostMember {
    fn drop(&mut self) {
        self.shut_down();
    }
}
