//! ONE conformance suite for herald's stores: the checks that every outbox
//! and inbox store passes, written once against the core contracts
//! ([`herald::OutboxStore`], [`herald::InboxStore`]) and run by each store
//! crate from its own tests. A store that passes keeps the outbox/inbox
//! contract of DESIGN.md guarantees 1, 2 and 4; [`Harness`] is all it must
//! provide to be checked.
//!
//! ```ignore
//! // crates/herald-<store>/tests/conformance.rs
//! struct MyHarness { /* a fresh database */ }
//! impl herald_conformance::Harness for MyHarness { /* ... */ }
//! async fn harness() -> Option<MyHarness> { /* None: skipped */ }
//!
//! herald_conformance::store_tests!(harness);
//! herald_conformance::relay_tests!(harness); // feature `kafka`
//! ```
//!
//! # Why a crate of its own
//!
//! The suite used to live in `herald-sqlite`'s tests, which therefore
//! dev-depended on `herald-postgres` to run it against PostgreSQL too. Here
//! it depends on the contracts only, and each store crate supplies its
//! [`Harness`] and runs the suite; no store crate depends on another.
//!
//! Not a module of `herald` behind a feature: the suite is test code (it
//! panics on a failed check, spawns tokio tasks, needs a multi-threaded
//! runtime), and the core crate stays a small dependency without a runtime,
//! whose public API is the contracts, not their checks. Not part of
//! `herald-test` either: that crate links rdkafka and sqlx (it reaches real
//! brokers and PostgreSQL servers), and the store contract needs neither.
//! This crate is `publish = false`, like `herald-test`.
//!
//! # Kafka
//!
//! Only one check needs a broker: the relay as it runs in production, from
//! the store to a real Kafka topic (`relay_tests!`, behind the `kafka`
//! feature). It checks the store's side of the relay (claims shared by two
//! relays, commit wake-ups), so it runs with each store's tests, as the
//! relay's other tests run with `herald-postgres`'s; `herald-kafka`'s own
//! tests have no store. Without the feature, the suite builds with neither
//! Kafka nor SQL.
//!
//! # Layout
//! - [`harness`]: [`Harness`], what a store provides to be checked, and the
//!   records the checks write ([`Rec`]).
//! - [`events`]: the event family the checks enqueue.
//! - [`suite`]: the checks of the store contract, each generic over a
//!   [`Harness`]; [`store_tests!`] makes them `#[tokio::test]`s.
//! - `relay` (feature `kafka`): the relay into Kafka; `relay_tests!`.

pub mod events;
pub mod harness;
#[cfg(feature = "kafka")]
pub mod relay;
pub mod suite;

pub use harness::{enqueue_committed, BoxError, Harness, Rec};

/// Instantiates every check of the store contract ([`suite`]) as a
/// `#[tokio::test]` for one store. `$factory` is an
/// `async fn() -> Option<impl Harness>` that opens a fresh store per test
/// (`None`: the store's service is missing; the test returns at once, and
/// the factory should fail instead under CI, as `herald_test`'s services
/// do). The calling crate needs `tokio` with its `macros` and
/// `rt-multi-thread` features.
#[macro_export]
macro_rules! store_tests {
    ($factory:path) => {
        $crate::store_tests!(@each $factory;
            publish_iff_commit,
            claims_keep_aggregate_order,
            a_partial_commit_releases_the_rest_in_order,
            a_second_claimer_never_gets_a_claimed_aggregate,
            concurrent_claimers_keep_order_and_disjoint_aggregates,
            a_late_commit_is_found_on_a_later_pass,
            mark_published_keeps_rows_delete_removes_them,
            status_backlog_and_retention,
            an_inbox_duplicate_has_one_effect,
            failed_effects_roll_back_the_inbox_row,
            concurrent_deliveries_have_one_effect,
        );
    };
    (@each $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $factory().await else {
                    return;
                };
                $crate::suite::$name(harness).await;
            }
        )*
    };
}

/// Instantiates the relay check ([`relay`]) as a `#[tokio::test]` for one
/// store, like [`store_tests!`]. It skips itself, loudly, when no broker is
/// reachable (and fails under CI).
#[cfg(feature = "kafka")]
#[macro_export]
macro_rules! relay_tests {
    ($factory:path) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_relay_publishes_each_aggregate_in_order_to_kafka() {
            let Some(harness) = $factory().await else {
                return;
            };
            $crate::relay::the_relay_publishes_each_aggregate_in_order_to_kafka(harness).await;
        }
    };
}
