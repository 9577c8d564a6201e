//! What every member of a consumer group herald runs is configured with:
//! the consumer runtime ([`crate::ConsumerConfig`]) and the processor
//! ([`crate::ProcessorConfig`]) each hold one [`GroupConfig`] beside their
//! own settings, so the shared fields, their defaults, their checks and the
//! consumer's layered librdkafka configuration are written once.

use std::time::Duration;

use herald::RetryPolicy;
use rdkafka::ClientConfig;

use crate::admin::TopicDurability;
use crate::consumer::CONSUMER_DEFAULTS;
use crate::error::ClientError;
use crate::settings::{self, Settings};

/// The settings a consumer-group member shares with every other kind.
#[derive(Debug, Clone)]
pub(crate) struct GroupConfig {
    /// Kafka bootstrap servers.
    pub(crate) brokers: String,
    /// The consumer group.
    pub(crate) group_id: String,
    /// The topics read.
    pub(crate) topics: Vec<String>,
    /// How transient failures are retried before a dead letter.
    pub(crate) retry: RetryPolicy,
    /// Dead-letter records of unknown event types instead of skipping them.
    pub(crate) dead_letter_unknown: bool,
    /// The dead-letter topic is the record's topic plus this.
    pub(crate) dlq_suffix: String,
    /// How long shutdown waits for work in flight.
    pub(crate) shutdown_timeout: Duration,
    /// librdkafka pass-through settings of the consumer.
    pub(crate) settings: Settings,
    /// librdkafka pass-through settings of the producer (dead letters,
    /// outputs).
    pub(crate) producer_settings: Settings,
    /// Replication of the topics the member creates for itself.
    pub(crate) topic_durability: TopicDurability,
}

impl GroupConfig {
    /// A member of `group_id` reading `topics`, with the shared defaults:
    /// [`RetryPolicy::default`], unknown event types skipped, dead letters
    /// to `<topic>.dlq`, 30 s for shutdown, created topics replicated as the
    /// cluster's default.
    pub(crate) fn new<T: Into<String>>(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            retry: RetryPolicy::default(),
            dead_letter_unknown: false,
            dlq_suffix: ".dlq".to_owned(),
            shutdown_timeout: Duration::from_secs(30),
            settings: Settings::default(),
            producer_settings: Settings::default(),
            topic_durability: TopicDurability::default(),
        }
    }

    /// Checks the shared settings; `fixed` are the consumer settings the
    /// member kind (`owner`, for the message) manages itself.
    pub(crate) fn validate(&self, owner: &str, fixed: &[(&str, &str)]) -> Result<(), ClientError> {
        let bad = |setting, reason: &str| {
            Err(ClientError::Setting {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.brokers.trim().is_empty() {
            return bad("brokers", "must not be empty");
        }
        if self.group_id.is_empty() {
            return bad("group_id", "must not be empty");
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return bad("topics", "need at least one non-empty topic name");
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts", "must be at least 1");
        }
        if self.dlq_suffix.is_empty() {
            return bad(
                "dlq_suffix",
                "must not be empty (the DLQ would be the topic itself)",
            );
        }
        for (key, _) in fixed {
            if self.settings.contains_key(*key) {
                return bad("settings", &format!("{key} is managed by the {owner}"));
            }
        }
        if self.settings.contains_key("group.id") {
            return bad("settings", "group.id is the group given to `new`");
        }
        self.topic_durability.validate()
    }

    /// The consumer's librdkafka configuration: the group, herald's
    /// defaults, the member kind's `extra` defaults, the pass-through
    /// settings, then the kind's `fixed` settings (later layers win).
    pub(crate) fn consumer_client_config<'a>(
        &'a self,
        extra: impl IntoIterator<Item = (&'a str, &'a str)>,
        fixed: &'a [(&'a str, &'a str)],
    ) -> ClientConfig {
        settings::layered(
            &self.brokers,
            std::iter::once(("group.id", self.group_id.as_str()))
                .chain(settings::table(CONSUMER_DEFAULTS))
                .chain(extra)
                .chain(settings::pairs(&self.settings))
                .chain(settings::table(fixed)),
        )
    }
}
