//! The thread a consumer or a processor polls librdkafka on, and what both
//! need around it.
//!
//! librdkafka's consumer runs its rebalance callbacks inside `poll`, so the
//! runtimes poll from a thread of their own rather than from a tokio worker
//! (a callback that commits or waits would stall the worker). That thread:
//! - is named after its group or transactional id, for stack dumps;
//! - enters the caller's tokio runtime, so that futures first polled there
//!   (handlers, timers) find it as they would on a worker;
//! - logs through the caller's tracing subscriber, also a scoped one;
//! - reports a panic as an error with its message, instead of vanishing.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use tokio::sync::oneshot;

use crate::error::ClientError;

/// Subscribes `consumer` to `topics`, naming the operation in the error.
pub(crate) fn subscribe<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[String],
) -> Result<(), ClientError> {
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| ClientError::Kafka {
            operation: "subscribing",
            source,
        })
}

/// Topic names shared by every record of a topic: a record keeps an
/// `Arc<str>` of its topic, not a `String` of its own.
#[derive(Debug, Default)]
pub(crate) struct TopicNames(Vec<Arc<str>>);

impl TopicNames {
    /// The shared name of `name` (a runtime reads a handful of topics, so a
    /// scan beats hashing).
    pub(crate) fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.0.iter().find(|t| &***t == name) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(name);
        self.0.push(Arc::clone(&t));
        t
    }
}

/// A running poll thread: how it ended arrives on a channel.
pub(crate) struct PollThread<R> {
    finished: oneshot::Receiver<Result<R, String>>,
}

/// How a poll thread ended.
pub(crate) struct Ended<R> {
    /// It returned (or panicked) before the caller asked it to stop.
    pub(crate) by_itself: bool,
    /// What it returned, or why it did not: the panic's message.
    pub(crate) outcome: Result<R, String>,
}

impl<R: Send + 'static> PollThread<R> {
    /// Runs `body` on a new thread named `name` (see the module doc).
    pub(crate) fn spawn(
        name: String,
        body: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Self, String> {
        let (finished_tx, finished) = oneshot::channel();
        let tokio = tokio::runtime::Handle::current();
        let subscriber = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _runtime = tokio.enter();
                let _subscriber = tracing::dispatcher::set_default(&subscriber);
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(body))
                    .map_err(|panic| format!("panicked: {}", herald::panic_text(&*panic)));
                let _ = finished_tx.send(outcome);
            })
            .map_err(|e| format!("cannot start the poll thread: {e}"))?;
        Ok(Self { finished })
    }

    /// Waits until the thread ends by itself or `shutdown` completes; in
    /// the second case `stop` tells the thread to finish, and the wait goes
    /// on until it has.
    pub(crate) async fn supervise(
        self,
        shutdown: impl Future<Output = ()>,
        stop: impl FnOnce(),
    ) -> Ended<R> {
        let vanished = |_| "the poll thread vanished".to_owned();
        let mut finished = self.finished;
        tokio::pin!(shutdown);
        tokio::select! {
            outcome = &mut finished => {
                return Ended { by_itself: true, outcome: outcome.map_err(vanished).and_then(|o| o) };
            }
            () = &mut shutdown => {}
        }
        stop();
        let outcome = finished.await.map_err(vanished).and_then(|o| o);
        Ended {
            by_itself: false,
            outcome,
        }
    }
}
