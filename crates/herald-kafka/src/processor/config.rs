//! The processor's configuration: a typed builder with production defaults and
//! librdkafka pass-through settings for its consumer and its producer.

use std::time::Duration;

use herald::RetryPolicy;
use rdkafka::ClientConfig;

use super::dedup::Deduplication;
use crate::admin::TopicDurability;
use crate::error::ClientError;
use crate::group::GroupConfig;
use crate::publisher::PRODUCER_DEFAULTS;
use crate::settings;

/// Consumer settings the processor owns: overriding them would break
/// exactly-once.
const CONSUMER_FIXED: &[(&str, &str)] = &[
    // Aborted outputs of an upstream processor must never be read as input.
    ("isolation.level", "read_committed"),
    // Offsets are committed only through the producer's transaction (at
    // least once: by the processor, after the outputs' deliveries).
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// The consumer setting partitioned state needs to be `range`.
const ASSIGNMENT_STRATEGY: &str = "partition.assignment.strategy";

/// Producer settings the processor owns.
const PRODUCER_FIXED: &[&str] = &["transactional.id", "enable.idempotence"];

/// What a [`Processor`](super::Processor) guarantees about its outputs; set
/// with [`ProcessorConfig::guarantee`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Guarantee {
    /// The default: the outputs, the dead letters and the input offsets of a
    /// batch commit in one Kafka transaction, so a `read_committed` reader
    /// sees the effect of every input exactly once, whatever crashes,
    /// restarts or rebalances happen; a restarted instance fences its zombie
    /// (DESIGN.md guarantee 6).
    #[default]
    ExactlyOnce,
    /// No transactions (no `transactional.id`, no fencing): the outputs and
    /// dead letters of a batch go out through an idempotent producer, every
    /// delivery is awaited, and only then are the inputs' offsets committed
    /// through the consumer. A crash, a failed commit or a lost assignment
    /// between the two makes inputs come again: outputs may be
    /// **duplicated, never lost**. Outputs are visible to every reader as
    /// soon as they are written. Changelog state
    /// ([`ProcessorConfig::changelog`]) is at least once too. For outputs
    /// whose consumers are idempotent anyway, or for comparing the cost of
    /// the transactions (`herald-bench processor`).
    AtLeastOnce,
}

/// Configuration of a [`Processor`](super::Processor).
///
/// ```
/// # use std::time::Duration;
/// use herald_kafka::processor::ProcessorConfig;
/// let config = ProcessorConfig::new("127.0.0.1:9092", "fulfillment", ["order-events"], "worker-1")
///     .source("/fulfillment")
///     .batch_size(1000)
///     .batch_time(Duration::from_millis(200));
/// assert_eq!(config.transactional_id(), "fulfillment-worker-1");
/// ```
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// What the consumer runtime is configured with too.
    pub(crate) group: GroupConfig,
    pub(crate) instance_id: String,
    pub(crate) source: String,
    pub(crate) guarantee: Guarantee,
    pub(crate) batch_size: usize,
    pub(crate) batch_time: Duration,
    pub(crate) changelogs: Vec<String>,
    pub(crate) partitioned_state: bool,
    pub(crate) deduplication: Option<Deduplication>,
    pub(crate) transaction_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) restore_timeout: Duration,
    pub(crate) restart: Option<RetryPolicy>,
}

impl ProcessorConfig {
    /// A processor of `topics` in consumer group `group_id`.
    ///
    /// `instance_id` names this instance for good: its `transactional.id` is
    /// `<group_id>-<instance_id>`, so an instance restarted under the same id
    /// fences its previous incarnation (a zombie that still runs can no longer
    /// commit). Give every concurrently running instance its own id (e.g. the
    /// pod's ordinal), and reuse it across restarts.
    ///
    /// Defaults: [`Guarantee::ExactlyOnce`]; transactions of up to 500 inputs or 100 ms, whichever comes
    /// first; [`RetryPolicy::default`]; unknown event types skipped; dead
    /// letters to `<topic>.dlq`; a 60 s transaction timeout; duplicate
    /// inputs dropped ([`ProcessorConfig::deduplication`]).
    pub fn new<T: Into<String>>(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
        instance_id: impl Into<String>,
    ) -> Self {
        Self {
            group: GroupConfig::new(brokers, group_id, topics),
            instance_id: instance_id.into(),
            source: String::new(),
            guarantee: Guarantee::ExactlyOnce,
            batch_size: 500,
            batch_time: Duration::from_millis(100),
            changelogs: Vec::new(),
            partitioned_state: false,
            deduplication: Some(Deduplication::default()),
            transaction_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(30),
            restore_timeout: Duration::from_secs(300),
            restart: Some(RetryPolicy::forever(
                Duration::from_secs(1),
                Duration::from_secs(30),
            )),
        }
    }

    /// Whether and how soon a processor that stopped on a restartable error
    /// ([`ProcessorError::is_restartable`](super::ProcessorError::is_restartable))
    /// starts again: the delay before restart `n` follows the policy
    /// (`max_attempts` and `deadline` are not used: it restarts for as long
    /// as it runs). Default: from 1 s, doubling, up to 30 s, jittered; a
    /// run of a minute or more starts the backoff over. `None`: `run`
    /// returns the error instead, as before.
    pub fn restart(mut self, policy: Option<RetryPolicy>) -> Self {
        self.restart = policy;
        self
    }

    /// The CloudEvents `ce_source` of outputs built with
    /// [`Input::output`](super::Input::output), e.g. `/fulfillment`.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Exactly once (the default, Kafka transactions) or at least once (no
    /// transactions; see [`Guarantee::AtLeastOnce`]).
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.guarantee = guarantee;
        self
    }

    /// The most inputs one transaction holds (at least once: one batch,
    /// whose outputs are awaited before its offsets are committed). Bigger batches amortize the
    /// commit (two round trips to the coordinator); smaller ones redo less
    /// work after an abort.
    pub fn batch_size(mut self, inputs: usize) -> Self {
        self.batch_size = inputs;
        self
    }

    /// The longest a transaction stays open before it is committed, which
    /// bounds the added latency seen by `read_committed` readers.
    pub fn batch_time(mut self, time: Duration) -> Self {
        self.batch_time = time;
        self
    }

    /// How transient transform failures are retried before the input is
    /// dead-lettered; its backoff also paces retries after Kafka errors.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.group.retry = policy;
        self
    }

    /// Dead-letter inputs whose `event_type` the family does not know, instead
    /// of skipping them (their offsets are committed either way).
    pub fn dead_letter_unknown(mut self, enabled: bool) -> Self {
        self.group.dead_letter_unknown = enabled;
        self
    }

    /// The dead-letter topic is the input's topic plus this suffix (`.dlq`).
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.group.dlq_suffix = suffix.into();
        self
    }

    /// How durable the completed-ids topic is when the processor creates it
    /// (default: as the cluster's default; see [`TopicDurability`]).
    pub fn topic_durability(mut self, durability: TopicDurability) -> Self {
        self.group.topic_durability = durability;
        self
    }

    /// A compacted changelog topic to read, `read_committed`, from its start
    /// to its end into [`Transform::restore`](super::Transform::restore) after
    /// this instance fenced its predecessor and before the first input.
    pub fn changelog(mut self, topic: impl Into<String>) -> Self {
        self.changelogs.push(topic.into());
        self
    }

    /// Partitions the state like the input, so several instances (each with
    /// its own `instance_id`) can share the group's work with their state
    /// following their partitions (default `false`: state is restored once,
    /// at start, from every changelog partition). Partition *p* of every
    /// changelog and of the completed-ids topic holds the state of input
    /// partition *p*: those topics need exactly the input topics' partition
    /// count (start-up fails otherwise; the completed-ids topic is created
    /// with it). The processor writes each changelog record to its input's
    /// partition, restores a changelog partition when its input partition is
    /// assigned (after the group's committed offset for it is stable, so the
    /// previous owner's last transaction is either in the changelog or
    /// aborted), and calls [`Transform::revoked`](super::Transform::revoked)
    /// when it goes. See [`super::changelog`].
    ///
    /// Several input topics are *co-partitioned*: partition *p* of each is
    /// assigned to the same instance (the consumer uses the `range`
    /// assignor, eager, instead of the group default `cooperative-sticky`,
    /// which balances each topic on its own; another
    /// `partition.assignment.strategy` is refused), so
    /// records of one key on two topics meet one state when both are keyed
    /// alike and written with one partitioner (every herald producer uses
    /// librdkafka's `murmur2_random`, Kafka's Java default). That is how a
    /// processor joins its own input with the answers of a next step it
    /// repartitioned to (orders' fulfillment topology does). An eager
    /// rebalance revokes every partition; the state of those assigned
    /// back to the same instance is kept, and only partitions that move
    /// are restored by their new owner.
    pub fn partitioned_state(mut self, partitioned: bool) -> Self {
        self.partitioned_state = partitioned;
        self
    }

    /// How duplicate inputs (the same `event_id` at another offset) are
    /// recognised and dropped; on by default ([`Deduplication::default`]),
    /// `None` turns it off. It applies to [`Guarantee::ExactlyOnce`] only:
    /// without transactions, the completed-ids record could be written while
    /// the input's outputs were not, and a redelivery would then be lost.
    /// See [`super::dedup`].
    pub fn deduplication(mut self, deduplication: Option<Deduplication>) -> Self {
        self.deduplication = deduplication;
        self
    }

    /// The deduplication in force and its topic: `None` when it is off or
    /// the guarantee is at least once.
    pub(crate) fn deduplication_in_force(&self) -> Option<(String, &Deduplication)> {
        let settings = self.deduplication.as_ref()?;
        if self.guarantee != Guarantee::ExactlyOnce {
            return None;
        }
        let topic = settings
            .topic
            .clone()
            .unwrap_or_else(|| format!("{}-completed", self.group.group_id));
        Some((topic, settings))
    }

    /// librdkafka's `transaction.timeout.ms`: the broker aborts a transaction
    /// left open longer (e.g. by a crashed instance that never restarts).
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// How long one blocking transactional call (init, send offsets, commit,
    /// abort) may take before it is treated as failed.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// How long restoring the changelogs may take before start-up fails.
    pub fn restore_timeout(mut self, timeout: Duration) -> Self {
        self.restore_timeout = timeout;
        self
    }

    /// How long shutdown waits for a running transform before aborting the
    /// open transaction (its inputs are then processed again by the next
    /// owner of their partitions).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.group.shutdown_timeout = timeout;
        self
    }

    /// Overrides or adds a librdkafka consumer setting (SASL, TLS, timeouts,
    /// `group.instance.id`…). Security settings (`security.*`, `sasl.*`,
    /// `ssl.*`) also apply to the producer. `isolation.level`,
    /// `enable.auto.commit` and `enable.auto.offset.store` are the
    /// processor's own.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.group.settings.insert(key.into(), value.into());
        self
    }

    /// Overrides or adds a librdkafka setting of the transactional producer.
    /// `transactional.id` and `enable.idempotence` are the processor's own.
    pub fn set_producer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.group
            .producer_settings
            .insert(key.into(), value.into());
        self
    }

    /// The producer's `transactional.id`: `<group_id>-<instance_id>` (at
    /// least once, the producer has none and this only names the instance).
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.group.group_id, self.instance_id)
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group.group_id
    }

    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        let bad = |setting, reason: &str| {
            Err(ClientError::Setting {
                setting,
                reason: reason.to_owned(),
            })
        };
        self.group.validate("processor", CONSUMER_FIXED)?;
        if self.instance_id.is_empty() {
            return bad(
                "instance_id",
                "must not be empty (it makes the transactional.id that fences zombies)",
            );
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.batch_time.is_zero() {
            return bad("batch_time", "must be positive");
        }
        if self.transaction_timeout < Duration::from_secs(1) {
            return bad("transaction_timeout", "must be at least one second");
        }
        if self.guarantee == Guarantee::ExactlyOnce && self.batch_time >= self.transaction_timeout {
            return bad(
                "batch_time",
                "must be shorter than transaction_timeout, or the broker aborts open batches",
            );
        }
        if self.operation_timeout.is_zero() {
            return bad("operation_timeout", "must be positive");
        }
        if self.changelogs.iter().any(String::is_empty) {
            return bad("changelog", "topic names must not be empty");
        }
        if self.partitioned_state
            && self
                .group
                .settings
                .get(ASSIGNMENT_STRATEGY)
                .is_some_and(|strategy| strategy.trim() != "range")
        {
            return bad(
                "partition.assignment.strategy",
                "must be `range` with partitioned_state: partition p of every input topic \
                 must go to the instance that holds state partition p",
            );
        }
        for key in PRODUCER_FIXED {
            if self.group.producer_settings.contains_key(*key) {
                return bad(
                    "producer_settings",
                    &format!("{key} is managed by the processor"),
                );
            }
        }
        Ok(())
    }

    pub(crate) fn consumer_client_config(&self) -> ClientConfig {
        // After an abort the consumer seeks back; the new fetch waits for
        // the long poll in flight at the end of the log, so keep it short.
        // Partitioned state: the range assignor gives partition p of every
        // (co-partitioned) input topic to one member; the group default,
        // cooperative-sticky, balances each topic on its own.
        let range = self
            .partitioned_state
            .then_some((ASSIGNMENT_STRATEGY, "range"));
        self.group.consumer_client_config(
            std::iter::once(("fetch.wait.max.ms", "100")).chain(range),
            CONSUMER_FIXED,
        )
    }

    pub(crate) fn producer_client_config(&self) -> ClientConfig {
        if self.guarantee == Guarantee::AtLeastOnce {
            // Idempotent, so the producer's own retries never duplicate or
            // reorder an output; no transactional.id, so nothing to fence.
            return settings::layered(
                &self.group.brokers,
                settings::table(PRODUCER_DEFAULTS)
                    .chain(settings::security(&self.group.settings))
                    .chain(settings::pairs(&self.group.producer_settings))
                    .chain([("enable.idempotence", "true")]),
            );
        }
        let txn_ms = self.transaction_timeout.as_millis().min(i32::MAX as u128);
        let transaction_timeout = txn_ms.to_string();
        // librdkafka rejects a message timeout longer than the transaction's.
        let message_timeout = txn_ms.min(30_000).to_string();
        let transactional_id = self.transactional_id();
        settings::layered(
            &self.group.brokers,
            settings::table(PRODUCER_DEFAULTS)
                .chain([
                    ("transaction.timeout.ms", transaction_timeout.as_str()),
                    ("message.timeout.ms", message_timeout.as_str()),
                    // A transaction's outputs reach the producer all at once
                    // when it commits (see `Engine::release_held`): waiting
                    // for more would only delay the commit.
                    ("linger.ms", "0"),
                ])
                .chain(settings::security(&self.group.settings))
                .chain(settings::pairs(&self.group.producer_settings))
                .chain([
                    ("transactional.id", transactional_id.as_str()),
                    ("enable.idempotence", "true"),
                ]),
        )
    }

    /// A group-less `read_committed` consumer for restoring changelogs.
    pub(crate) fn restore_client_config(&self) -> ClientConfig {
        settings::layered(
            &self.group.brokers,
            settings::security(&self.group.settings),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProcessorConfig {
        ProcessorConfig::new("127.0.0.1:9092", "g", ["in"], "i1")
    }

    #[test]
    fn rejects_bad_settings_by_name() {
        let setting = |c: ProcessorConfig| match c.validate() {
            Err(ClientError::Setting { setting, .. }) => setting,
            other => panic!("expected a setting error, got {other:?}"),
        };
        assert!(config().validate().is_ok());
        assert_eq!(
            setting(ProcessorConfig::new("b", "g", ["in"], "")),
            "instance_id"
        );
        assert_eq!(setting(config().batch_size(0)), "batch_size");
        assert_eq!(
            setting(config().set("isolation.level", "read_uncommitted")),
            "settings"
        );
        assert_eq!(
            setting(config().set_producer("transactional.id", "x")),
            "producer_settings"
        );
        assert_eq!(
            setting(config().batch_time(Duration::from_secs(120))),
            "batch_time"
        );
    }

    #[test]
    fn fixed_settings_win_over_pass_through() {
        let producer = config()
            .set("sasl.username", "u")
            .set_producer("linger.ms", "20")
            .producer_client_config();
        assert_eq!(producer.get("transactional.id"), Some("g-i1"));
        assert_eq!(producer.get("sasl.username"), Some("u"));
        assert_eq!(producer.get("linger.ms"), Some("20"));
        let consumer = config().consumer_client_config();
        assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn partitioned_state_co_partitions_its_inputs_with_the_range_assignor() {
        let consumer = config().partitioned_state(true).consumer_client_config();
        assert_eq!(consumer.get(ASSIGNMENT_STRATEGY), Some("range"));
        let sticky = config()
            .partitioned_state(true)
            .set(ASSIGNMENT_STRATEGY, "cooperative-sticky");
        assert!(matches!(
            sticky.validate(),
            Err(ClientError::Setting { setting, .. }) if setting == ASSIGNMENT_STRATEGY
        ));
        // Without partitioned state the group default (incremental) stays.
        let consumer = config().consumer_client_config();
        assert_eq!(
            consumer.get(ASSIGNMENT_STRATEGY),
            Some("cooperative-sticky")
        );
    }

    #[test]
    fn at_least_once_has_no_transactional_id() {
        assert_eq!(config().guarantee, Guarantee::ExactlyOnce);
        let config = config().guarantee(Guarantee::AtLeastOnce);
        let producer = config.producer_client_config();
        assert_eq!(producer.get("transactional.id"), None);
        assert_eq!(producer.get("transaction.timeout.ms"), None);
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = config.consumer_client_config();
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        // No transaction for the broker to time out: a long batch is fine.
        assert!(config
            .batch_time(Duration::from_secs(120))
            .validate()
            .is_ok());
    }
}
