//! ONE conformance suite for herald's stores: the generic checks in
//! [`suite`] run against SQLite (a temporary file per test, [`sqlite`]) and
//! against real PostgreSQL (a fresh database per test, [`postgres`]). A store
//! that passes keeps the outbox/inbox contract of DESIGN.md guarantees 1, 2
//! and 4; [`harness::Harness`] is all a store must provide to be checked.

mod harness;
mod postgres;
mod sqlite;
mod suite;

/// Instantiates every check of the suite as a `#[tokio::test]` for one store.
/// `$factory` is an `async fn() -> Option<impl Harness>` (`None`: the store's
/// service is missing, the test is skipped loudly, or fails under CI).
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance_tests!(@each $factory;
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
            the_relay_publishes_each_aggregate_in_order_to_kafka,
        );
    };
    (@each $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $factory().await else {
                    return;
                };
                crate::suite::$name(harness).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;
