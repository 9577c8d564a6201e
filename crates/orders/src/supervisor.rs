//! The parts of one process run side by side, and one that fails does not
//! take the others down: it is started again with backoff (as a process
//! supervisor would start a crashed process), while `/readyz` reports it.
//!
//! A part that fails at once at start-up (bad configuration) is still an
//! error of the whole process: [`crate::app::Application::build`] checks the
//! configuration before anything runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald::RetryPolicy;
use tokio_util::sync::CancellationToken;

/// What each supervised part is doing, for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, String>>>);

impl Health {
    fn set(&self, component: &str, state: impl Into<String>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(component.to_owned(), state.into());
    }

    /// Marks `component` running (a part that stood by and now runs).
    pub fn running(&self, component: &str) {
        self.set(component, RUNNING);
    }

    /// Each part and its state: `running`, `standing_by` (another process
    /// runs it), or `restarting` (it failed and waits to be started again).
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether every part runs (or stands by, as it should).
    pub fn all_running(&self) -> bool {
        self.snapshot()
            .values()
            .all(|state| state == RUNNING || state == STANDING_BY)
    }
}

const RUNNING: &str = "running";
const RESTARTING: &str = "restarting";
const STANDING_BY: &str = "standing_by";

/// Waits until this process holds PostgreSQL's session advisory lock for
/// `name` — at most one session across every process on the database holds
/// it — and returns the connection that holds it: the lock lasts as long
/// as that connection (it is taken out of the pool, and closing it, or
/// losing it, releases the lock). Meanwhile `component` is reported as
/// standing by, and the log says once which part waits for what. `None`
/// when `stop` comes first.
///
/// A part that must be single-active (the fulfillment processor: a second
/// instance with its transactional id would fence the first, which would
/// fence it back) runs only while it holds its lock. Should the connection
/// be lost and another process take the lock, the Kafka fencing still
/// stops whichever instance is older; its supervisor then waits here.
pub async fn single_active(
    pool: &sqlx::PgPool,
    name: &str,
    component: &str,
    health: &Health,
    stop: &CancellationToken,
) -> anyhow::Result<Option<sqlx::PgConnection>> {
    use anyhow::Context as _;
    let mut announced = false;
    let mut conn = pool
        .acquire()
        .await
        .context("a connection for the single-active lock")?
        .detach();
    loop {
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1)::bigint)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .context("taking the single-active lock")?;
        if held {
            if announced {
                tracing::info!(
                    component,
                    lock = name,
                    "took over: the other instance is gone"
                );
            }
            return Ok(Some(conn));
        }
        if !announced {
            health.set(component, STANDING_BY);
            tracing::warn!(
                component,
                lock = name,
                "standing by: another process runs this part against the same database \
                 (it takes over when that one stops)"
            );
            announced = true;
        }
        tokio::select! {
            () = tokio::time::sleep(STANDBY_POLL) => {}
            () = stop.cancelled() => return Ok(None),
        }
    }
}

/// How often a standing-by part asks for the lock again.
const STANDBY_POLL: Duration = Duration::from_secs(2);

/// The pause before start `n + 1` after `n` failures: from 1 s, doubling,
/// up to 30 s, jittered. A run of a minute or more starts it over.
fn backoff() -> RetryPolicy {
    RetryPolicy::forever(Duration::from_secs(1), Duration::from_secs(30))
}

/// A run shorter than this counts towards the backoff.
const RESET_AFTER: Duration = Duration::from_secs(60);

/// Runs the part that `start` makes until `stop`, and makes and runs it
/// again whenever it fails. Returns when `stop` is cancelled (or the part
/// ends by itself without an error).
pub async fn supervise<F, Fut>(
    component: &str,
    health: Health,
    stop: CancellationToken,
    mut start: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> anyhow::Result<Fut> + Send,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let policy = backoff();
    let mut failures: u32 = 0;
    loop {
        health.set(component, RUNNING);
        let started = Instant::now();
        let result = match start() {
            Ok(run) => run.await,
            Err(error) => Err(error),
        };
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) if stop.is_cancelled() => return Err(error),
            Err(error) => error,
        };
        if started.elapsed() >= RESET_AFTER {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = policy.pause(failures);
        health.set(component, RESTARTING);
        tracing::error!(
            component,
            error = format!("{error:#}"),
            failures,
            ?delay,
            "component failed; starting it again (the process's other parts go on)"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_part_is_started_again_and_reported_meanwhile() {
        let health = Health::default();
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (health, stop, starts) = (health.clone(), stop.clone(), Arc::clone(&starts));
            async move {
                supervise("processor", health, stop.clone(), move || {
                    let n = starts.fetch_add(1, Ordering::SeqCst);
                    let stop = stop.clone();
                    Ok(async move {
                        if n < 2 {
                            anyhow::bail!("broker gone");
                        }
                        stop.cancelled().await;
                        Ok(())
                    })
                })
                .await
            }
        });
        // Past both backoffs (at most 1 s, then at most 2 s).
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3, "started again twice");
        assert!(health.all_running(), "{:?}", health.snapshot());
        stop.cancel();
        task.await.expect("task").expect("stopped cleanly");
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_waiting_to_restart_is_not_running() {
        let health = Health::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (health, stop) = (health.clone(), stop.clone());
            async move {
                supervise("relay", health, stop, || {
                    Ok(async { Err::<(), _>(anyhow::anyhow!("always")) })
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(health.snapshot()["relay"], "restarting");
        assert!(!health.all_running());
        stop.cancel();
        task.await
            .expect("task")
            .expect("a stop while waiting is clean");
    }
}
