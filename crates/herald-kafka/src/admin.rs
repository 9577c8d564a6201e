//! The topics herald makes for itself (the relay's checkpoints, the
//! processor's completed inputs), created at start when missing, and how
//! durable they and an application's topics are ([`TopicDurability`],
//! [`describe_replication`]).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::error::ClientError;

/// How durable the topics herald creates are: how many copies of each
/// partition the cluster keeps (`replication_factor`), and how many of them
/// must have a record before a producer with `acks=all` is told it is
/// written (`min.insync.replicas`).
///
/// The default leaves both to the cluster (its `default.replication.factor`
/// and `min.insync.replicas`, as for a topic the broker creates itself), so
/// the same configuration works on a one-node development broker and on a
/// replicated cluster whose brokers are set up for it. A topic that already
/// exists keeps what it has; [`describe_replication`] reads that back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicDurability {
    replication_factor: Option<u16>,
    min_insync_replicas: Option<u16>,
}

impl TopicDurability {
    /// Both left to the cluster (the default).
    pub fn cluster_default() -> Self {
        Self::default()
    }

    /// Copies of each partition of a created topic; `None`, the cluster's
    /// `default.replication.factor`.
    pub fn replication_factor(mut self, replicas: impl Into<Option<u16>>) -> Self {
        self.replication_factor = replicas.into();
        self
    }

    /// `min.insync.replicas` of a created topic; `None`, the cluster's.
    pub fn min_insync_replicas(mut self, replicas: impl Into<Option<u16>>) -> Self {
        self.min_insync_replicas = replicas.into();
        self
    }

    /// The replication factor asked for (`None`: the cluster's).
    pub fn required_replication_factor(&self) -> Option<u16> {
        self.replication_factor
    }

    /// The `min.insync.replicas` asked for (`None`: the cluster's).
    pub fn required_min_insync_replicas(&self) -> Option<u16> {
        self.min_insync_replicas
    }

    /// Whether both are left to the cluster.
    pub fn is_cluster_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the values: neither may be zero, and a topic whose
    /// `min.insync.replicas` exceeds its replicas refuses every `acks=all`
    /// write.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |setting, reason: String| Err(ClientError::Setting { setting, reason });
        if self.replication_factor == Some(0) {
            return bad(
                "topic_durability.replication_factor",
                "must be at least 1 (None: the cluster's default)".to_owned(),
            );
        }
        if self.min_insync_replicas == Some(0) {
            return bad(
                "topic_durability.min_insync_replicas",
                "must be at least 1 (None: the cluster's default)".to_owned(),
            );
        }
        if let (Some(replicas), Some(min_insync)) =
            (self.replication_factor, self.min_insync_replicas)
        {
            if min_insync > replicas {
                return bad(
                    "topic_durability.min_insync_replicas",
                    format!(
                        "{min_insync} is more than the replication factor {replicas}: \
                         every acks=all write would be refused"
                    ),
                );
            }
        }
        Ok(())
    }

    /// What `found` lacks of this durability, each shortfall once; empty
    /// when it meets it (a value left to the cluster is met by anything).
    /// More replicas or a higher `min.insync.replicas` than asked for meet
    /// it: they are more durable, not less.
    pub fn shortfalls(&self, found: &TopicReplicas) -> Vec<Shortfall> {
        let mut short = Vec::new();
        if let Some(required) = self.replication_factor {
            if found.replication_factor < usize::from(required) {
                short.push(Shortfall::ReplicationFactor {
                    has: found.replication_factor,
                    required,
                });
            }
        }
        if let Some(required) = self.min_insync_replicas {
            if found.min_insync_replicas.is_none_or(|has| has < required) {
                short.push(Shortfall::MinInsyncReplicas {
                    has: found.min_insync_replicas,
                    required,
                });
            }
        }
        short
    }

    /// The creation request of `name`: the replication factor, or `-1`,
    /// which asks the broker for its default (KIP-464), and
    /// `min.insync.replicas` when set (held by the caller, as `NewTopic`
    /// borrows its configuration values).
    pub(crate) fn new_topic<'a>(
        replication_factor: Option<u16>,
        min_insync: Option<&'a str>,
        name: &'a str,
        partitions: i32,
    ) -> NewTopic<'a> {
        let replication = TopicReplication::Fixed(replication_factor.map_or(-1, i32::from));
        let topic = NewTopic::new(name, partitions, replication);
        match min_insync {
            Some(value) => topic.set("min.insync.replicas", value),
            None => topic,
        }
    }
}

/// How a topic on the cluster is replicated, as [`describe_replication`]
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicReplicas {
    /// Replicas of its least replicated partition.
    pub replication_factor: usize,
    /// Its `min.insync.replicas` (its own, or the broker's it inherits);
    /// `None` when the cluster does not say (a mock cluster).
    pub min_insync_replicas: Option<u16>,
}

/// What a topic lacks of the configured [`TopicDurability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// Fewer replicas than required.
    ReplicationFactor {
        /// Replicas of its least replicated partition.
        has: usize,
        /// The configured replication factor.
        required: u16,
    },
    /// A lower `min.insync.replicas` than required (`None`: unknown).
    MinInsyncReplicas {
        /// Its `min.insync.replicas`.
        has: Option<u16>,
        /// The configured `min.insync.replicas`.
        required: u16,
    },
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReplicationFactor { has, required } => {
                write!(f, "replication factor {has}, {required} required")
            }
            Self::MinInsyncReplicas {
                has: Some(has),
                required,
            } => write!(f, "min.insync.replicas {has}, {required} required"),
            Self::MinInsyncReplicas {
                has: None,
                required,
            } => write!(
                f,
                "min.insync.replicas unknown (the cluster did not say), {required} required"
            ),
        }
    }
}

/// Reads how each of `topics` is replicated: its replicas (from the
/// cluster's metadata) and its effective `min.insync.replicas` (from its
/// configuration); `None` for a topic that does not exist.
pub async fn describe_replication(
    client: &ClientConfig,
    topics: &[&str],
    timeout: Duration,
) -> Result<Vec<Option<TopicReplicas>>, ClientError> {
    use rdkafka::admin::ResourceSpecifier;
    let failed = |operation| move |source| ClientError::Kafka { operation, source };
    let mut client = client.clone();
    // Reading a missing topic's metadata must not create it.
    client.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(ClientError::Config)?;
    let mut replicas = Vec::with_capacity(topics.len());
    for topic in topics {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(topic), timeout)
            .map_err(failed("reading a topic's metadata"))?;
        replicas.push(
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == *topic && t.error().is_none() && !t.partitions().is_empty())
                .map(|t| {
                    t.partitions()
                        .iter()
                        .map(|p| p.replicas().len())
                        .min()
                        .unwrap_or(0)
                }),
        );
    }
    let specifiers: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .zip(&replicas)
        .filter(|(_, found)| found.is_some())
        .map(|(t, _)| ResourceSpecifier::Topic(t))
        .collect();
    let mut configs = if specifiers.is_empty() {
        Vec::new()
    } else {
        admin
            .describe_configs(
                &specifiers,
                &AdminOptions::new().request_timeout(Some(timeout)),
            )
            .await
            .map_err(failed("reading the topics' min.insync.replicas"))?
    }
    .into_iter();
    Ok(replicas
        .into_iter()
        .map(|found| {
            let replication_factor = found?;
            // One result per existing topic, in the order asked.
            let min_insync_replicas = configs.next().and_then(|result| {
                result
                    .ok()?
                    .get("min.insync.replicas")?
                    .value
                    .as_deref()?
                    .parse()
                    .ok()
            });
            Some(TopicReplicas {
                replication_factor,
                min_insync_replicas,
            })
        })
        .collect())
}

/// Creates `topic`, compacted, with `partitions` partitions and
/// `durability`, unless it exists; returns how many partitions it has (an
/// existing topic keeps its own count and replication).
/// How many partitions `topic` has (0 when it does not exist), from the
/// cluster's metadata. Blocks for up to `timeout`.
pub(crate) fn partition_count(
    client: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<usize, ClientError> {
    let mut client = client.clone();
    client.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(ClientError::Config)?;
    partitions_in(&admin, topic, timeout)
}

/// [`partition_count`] through an admin client the caller has.
fn partitions_in(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, ClientError> {
    let metadata = admin
        .inner()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| ClientError::Kafka {
            operation: "reading a topic's metadata",
            source,
        })?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len()))
}

pub(crate) async fn ensure_compacted_topic(
    client: &ClientConfig,
    topic: &str,
    partitions: i32,
    durability: TopicDurability,
    timeout: Duration,
) -> Result<usize, ClientError> {
    let failed = |operation| move |source| ClientError::Kafka { operation, source };
    let mut client = client.clone();
    // A metadata request for a missing topic must not make the broker
    // create it with its defaults (one partition, not compacted).
    client.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(ClientError::Config)?;
    let partitions_of = |timeout| partitions_in(&admin, topic, timeout);
    // An existing topic is used as it is (librdkafka's mock cluster, the
    // embedded mode's broker, cannot create topics at all).
    let existing = partitions_of(timeout)?;
    if existing > 0 {
        return Ok(existing);
    }
    let min_insync = durability.min_insync_replicas.map(|n| n.to_string());
    let new = TopicDurability::new_topic(
        durability.replication_factor,
        min_insync.as_deref(),
        topic,
        partitions,
    )
    .set("cleanup.policy", "compact");
    let created = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(timeout)),
        )
        .await
        .map_err(failed("creating a herald topic"))?;
    for result in created {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(failed("creating a herald topic")(KafkaError::AdminOp(code)))
            }
        }
    }
    // A topic created a moment ago may take a little while to show all its
    // partitions in the metadata: look again until the deadline.
    let deadline = Instant::now() + timeout;
    loop {
        let found = partitions_of(timeout)?;
        if found >= usize::try_from(partitions).unwrap_or(0) || Instant::now() >= deadline {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: u64 = 1_000_000;

/// Checks that each of `topics` takes the largest record batch `publisher`
/// may send. The broker applies a topic's `max.message.bytes` to a whole
/// record batch and refuses the batch, every record in it reporting
/// `MessageSizeTooLarge`: a topic whose limit is below the producer's
/// `message.max.bytes` or `batch.size` would have innocent records refused
/// beside an oversized one (and a relay park their aggregates), where a
/// producer held to the topic's limit refuses the oversized record alone,
/// before it is sent. Topics that do not exist yet are skipped.
pub async fn check_record_limits(
    publisher: &crate::PublisherConfig,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), ClientError> {
    use rdkafka::admin::ResourceSpecifier;
    let client = publisher.client_config();
    let setting = |name: &str, default: u64| {
        client
            .get(name)
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(default)
    };
    let largest = setting("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)
        .max(setting("batch.size", LIBRDKAFKA_MESSAGE_MAX_BYTES));
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(ClientError::Config)?;
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let described = admin
        .describe_configs(
            &specifiers,
            &AdminOptions::new().request_timeout(Some(timeout)),
        )
        .await
        .map_err(|source| ClientError::Kafka {
            operation: "reading the topics' max.message.bytes",
            source,
        })?;
    for (topic, result) in topics.iter().zip(described) {
        let Ok(resource) = result else { continue };
        let Some(limit) = resource
            .get("max.message.bytes")
            .and_then(|entry| entry.value.as_deref())
            .and_then(|value| value.parse::<u64>().ok())
        else {
            continue;
        };
        if limit < largest {
            return Err(ClientError::Setting {
                setting: "message.max.bytes",
                reason: format!(
                    "topic {topic:?} takes record batches of at most {limit} bytes \
                     (max.message.bytes), but the producer may send {largest} \
                     (message.max.bytes / batch.size): set both to at most {limit}, or \
                     raise the topic's max.message.bytes"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(replication_factor: usize, min_insync: Option<u16>) -> TopicReplicas {
        TopicReplicas {
            replication_factor,
            min_insync_replicas: min_insync,
        }
    }

    #[test]
    fn the_cluster_default_is_met_by_any_topic() {
        let durability = TopicDurability::default();
        assert!(durability.is_cluster_default());
        assert!(durability.validate().is_ok());
        assert!(durability.shortfalls(&found(1, Some(1))).is_empty());
        assert!(durability.shortfalls(&found(1, None)).is_empty());
    }

    #[test]
    fn shortfalls_name_what_is_missing() {
        let durability = TopicDurability::default()
            .replication_factor(3)
            .min_insync_replicas(2);
        assert!(!durability.is_cluster_default());
        assert_eq!(
            durability.shortfalls(&found(1, Some(1))),
            [
                Shortfall::ReplicationFactor {
                    has: 1,
                    required: 3
                },
                Shortfall::MinInsyncReplicas {
                    has: Some(1),
                    required: 2
                },
            ]
        );
        assert_eq!(
            durability.shortfalls(&found(1, Some(1)))[0].to_string(),
            "replication factor 1, 3 required"
        );
        // More is more durable: it meets the requirement.
        assert!(durability.shortfalls(&found(5, Some(3))).is_empty());
        // An unknown min.insync.replicas does not meet a required one.
        assert_eq!(
            durability.shortfalls(&found(3, None)),
            [Shortfall::MinInsyncReplicas {
                has: None,
                required: 2
            }]
        );
        // Only what is set is checked.
        let replicas_only = TopicDurability::default().replication_factor(3);
        assert!(replicas_only.shortfalls(&found(3, Some(1))).is_empty());
    }

    #[test]
    fn validate_refuses_zero_and_more_in_sync_than_replicas() {
        let setting_of = |durability: TopicDurability| match durability.validate() {
            Err(ClientError::Setting { setting, .. }) => setting,
            other => panic!("expected a setting error, got {other:?}"),
        };
        assert_eq!(
            setting_of(TopicDurability::default().replication_factor(0)),
            "topic_durability.replication_factor"
        );
        assert_eq!(
            setting_of(TopicDurability::default().min_insync_replicas(0)),
            "topic_durability.min_insync_replicas"
        );
        assert_eq!(
            setting_of(
                TopicDurability::default()
                    .replication_factor(2)
                    .min_insync_replicas(3)
            ),
            "topic_durability.min_insync_replicas"
        );
        // min.insync.replicas alone is checked against the cluster's
        // replication by the broker, not here.
        assert!(TopicDurability::default()
            .min_insync_replicas(3)
            .validate()
            .is_ok());
    }

    #[test]
    fn a_new_topic_asks_for_the_broker_default_unless_set() {
        let default = TopicDurability::new_topic(None, None, "t", 3);
        assert!(matches!(default.replication, TopicReplication::Fixed(-1)));
        assert!(default.config.is_empty());
        let set = TopicDurability::new_topic(Some(3), Some("2"), "t", 3);
        assert!(matches!(set.replication, TopicReplication::Fixed(3)));
        assert_eq!(set.config, [("min.insync.replicas", "2")]);
    }
}
