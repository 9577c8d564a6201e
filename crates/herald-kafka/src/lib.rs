//! herald on Apache Kafka, through rdkafka (librdkafka built from the crate's
//! bundled source): the typed [`Publisher`] and the [`Consumer`] runtime with
//! retries, dead letters, per-key ordering and safe commits.
//!
//! # Layout
//! - [`publisher`]: [`Publisher`] and [`PublisherConfig`] (production defaults,
//!   Java-compatible partitioning, batched publishing), [`OutgoingRecord`].
//! - [`consumer`]: [`Consumer`], [`ConsumerConfig`], the [`Router`] of typed
//!   handlers; `consumer/runtime.rs` is the poll loop, `scheduler.rs` the
//!   task that queues records per key and starts them, `offsets.rs` the
//!   commit tracker, `record.rs` consumed records copied into shared chunks,
//!   `process.rs` one record's retries and dead letter, `stored.rs` where
//!   assigned partitions start when offsets are kept in a store.
//! - [`dlq`]: the dead-letter record format (`dlq.*` headers), reading
//!   dead letters back and redriving them.
//! - [`parking`]: per-key parking behind a dead letter: the parked-key
//!   table (a compacted topic) and the redrive headers.
//! - [`processor`]: exactly-once consume → transform → produce in Kafka
//!   transactions ([`Processor`], [`Transform`], changelog state,
//!   `processor/dedup.rs` the duplicate-input filter; the engine in
//!   `processor/runtime/`, a file per concern: inputs, failures,
//!   transactions, rebalances).
//! - [`relay`]: the outbox relays: [`TransactionalRelay`] (exactly once, over
//!   a [`herald::SlotStore`]; `relay/checkpoint.rs` its checkpoint topic) and
//!   [`Relay`] (at least once, over any [`herald::OutboxStore`]).
//! - [`connect`]: [`check_cluster`], the start-up check that names the
//!   setting (credentials, CA, security protocol) a failed connection points at.
//! - `poll_thread.rs`: the thread the consumer and the processor poll on
//!   (named, in the caller's tokio runtime and tracing subscriber, a panic
//!   reported as an error), their subscribe, and topic-name interning.
//! - `group.rs`: the settings the consumer runtime and the processor share
//!   as members of a consumer group (brokers, group, topics, retries, dead
//!   letters, pass-through settings), held once by both configurations.
//! - `sweep.rs`: why and how a transactional instance aborts what an earlier
//!   instance of its id left open before it commits in a partition (used by
//!   the processor and the exactly-once relay).
//! - [`error`]: error types and the retriable/fatal classification.
//! - [`metrics`]: Prometheus label sets and buckets, and the `stats!` macro
//!   that declares each component's stats value (reading methods and a
//!   collector for the service's registry) from one list of figures.
//! - `admin.rs`: the compacted topics herald creates for itself (relay
//!   checkpoints, processor completed ids) with their [`TopicDurability`],
//!   [`describe_replication`] (how a topic is replicated, to check it), and
//!   [`check_record_limits`] (a topic's `max.message.bytes` against the
//!   producer's batches).

mod admin;
pub mod connect;
pub mod consumer;
pub mod dlq;
pub mod error;
mod group;
pub mod metrics;
pub mod parking;
mod poll_thread;
pub mod processor;
pub mod publisher;
pub mod relay;
mod settings;
mod sweep;

pub use admin::{
    check_record_limits, describe_replication, Shortfall, TopicDurability, TopicReplicas,
};
pub use connect::{check_cluster, ConnectError};
pub use consumer::{
    envelope_of, CircuitBreaker, Consumer, ConsumerConfig, ConsumerStats, DeadLetterMode, Handler,
    IntoHandler, RecordInfo, Router,
};
pub use error::{is_retriable, ClientError, PublishError};
pub use processor::{Guarantee, Processor, ProcessorConfig, ProcessorError, Transform};
pub use publisher::{
    BorrowedRecord, Delivered, OutgoingRecord, Publisher, PublisherConfig, PublisherStats,
};
pub use relay::{
    Delivery, ExactlyOnceConfig, FaultHook, Relay, RelayConfig, RelayPoint, RelayStats,
    TransactionalRelay,
};
