//! The service's topics on Kafka: which it needs (with their partitions and
//! which keep state), creating them, and the start-up check that the
//! cluster answers with the configured settings.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::Config;

/// The service's topics with their partitions. The fulfillment
/// topology's internal and state topics have the partition count of
/// `order-events`: its state is partitioned like its inputs.
pub(super) fn topic_plan(config: &Config) -> Vec<(String, i32)> {
    let fulfillment = crate::fulfillment::Topics::of(&config.fulfillment_topic);
    let mut plan = vec![
        (config.topics.events.clone(), config.partitions),
        (format!("{}.dlq", config.topics.events), config.partitions),
        (config.fulfillment_topic.clone(), config.partitions),
    ];
    plan.extend(
        fulfillment
            .internal()
            .map(|topic| (topic.to_owned(), config.partitions)),
    );
    // The consumers' parked-key table.
    plan.push((herald_kafka::parking::DEFAULT_PARKED_TOPIC.to_owned(), 1));
    plan
}

/// Whether `topic` of the plan keeps state, so is compacted (the latest
/// value per key stays).
fn is_compacted(config: &Config, topic: &str) -> bool {
    topic == herald_kafka::parking::DEFAULT_PARKED_TOPIC
        || crate::fulfillment::Topics::of(&config.fulfillment_topic).is_compacted(topic)
}

/// How long the start-up of a process that needs Kafka waits for a broker
/// to answer.
pub(super) const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an API alone waits: it does not need Kafka to take orders, so
/// it waits only long enough to catch a bad setting.
const API_KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks that the Kafka settings reach the cluster, so that a wrong
/// password, CA or security protocol fails the start-up naming the setting
/// to fix. A cluster that is only away fails just the processes that need
/// it now: an API alone keeps taking orders into the outbox.
pub(super) async fn check_kafka(config: &Config, required: bool) -> anyhow::Result<()> {
    let timeout = if required {
        KAFKA_CHECK_TIMEOUT
    } else {
        API_KAFKA_CHECK_TIMEOUT
    };
    match herald_kafka::check_cluster(&config.kafka_client_config(), timeout).await {
        Ok(()) => Ok(()),
        Err(error) if required || error.is_configuration() => Err(anyhow::Error::new(error)
            .context("connecting to KAFKA_BROKERS (--kafka-brokers) with the --kafka-setting / KAFKA_SETTINGS values")),
        Err(error) => {
            tracing::warn!(error = %error, "Kafka is not reachable now; the API keeps taking orders into the outbox");
            Ok(())
        }
    }
}

/// The settings that require a topic's replication, as the errors name them.
const REPLICATION_FACTOR_SETTING: &str =
    "ORDERS_TOPIC_REPLICATION_FACTOR (--topic-replication-factor)";
const MIN_INSYNC_SETTING: &str = "ORDERS_TOPIC_MIN_INSYNC_REPLICAS (--topic-min-insync-replicas)";

/// Creates the service's topics if they do not exist, with the configured
/// replication, then checks every one of them against it
/// ([`check_durability`]).
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .kafka_client_config()
        .create()
        .context("creating the Kafka admin client (check --kafka-setting)")?;
    let plan = topic_plan(config);
    let durability = config.topic_durability;
    // -1 asks the broker for its default.replication.factor (KIP-464).
    let replicas = durability
        .required_replication_factor()
        .map_or(-1, i32::from);
    let min_insync = durability
        .required_min_insync_replicas()
        .map(|n| n.to_string());
    let topics: Vec<NewTopic> = plan
        .iter()
        .map(|(name, partitions)| {
            let mut topic = NewTopic::new(name, *partitions, TopicReplication::Fixed(replicas));
            if let Some(min_insync) = &min_insync {
                topic = topic.set("min.insync.replicas", min_insync);
            }
            if is_compacted(config, name) {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("creating topics (is KAFKA_BROKERS reachable?)")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // The cluster refused the replication asked for (e.g. more
            // replicas than it has brokers).
            Err((
                topic,
                code @ (RDKafkaErrorCode::InvalidReplicationFactor
                | RDKafkaErrorCode::InvalidConfig),
            )) if !durability.is_cluster_default() => {
                bail!(
                    "creating topic {topic} with replication factor {} and min.insync.replicas {}: \
                     {code} (does the cluster have that many brokers? set {REPLICATION_FACTOR_SETTING} \
                     and {MIN_INSYNC_SETTING} to what it can keep, or leave them unset for its defaults)",
                    shown(durability.required_replication_factor()),
                    shown(durability.required_min_insync_replicas()),
                );
            }
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    check_durability(config).await
}

/// A configured value, or that the cluster decides it.
fn shown(value: Option<u16>) -> String {
    value.map_or_else(|| "the cluster's default".to_owned(), |n| n.to_string())
}

/// Checks that the service's topics, created or found, are as durable as
/// ORDERS_TOPIC_REPLICATION_FACTOR and ORDERS_TOPIC_MIN_INSYNC_REPLICAS
/// require: an existing topic keeps the replication it was made with, and
/// a relay that counts an event as published on one replica would lose it
/// with that broker. Left to the cluster, the check only logs what the
/// topics have.
pub(super) async fn check_durability(config: &Config) -> anyhow::Result<()> {
    let plan = topic_plan(config);
    let names: Vec<&str> = plan.iter().map(|(name, _)| name.as_str()).collect();
    let found = herald_kafka::describe_replication(
        &config.kafka_client_config(),
        &names,
        KAFKA_CHECK_TIMEOUT,
    )
    .await
    .context("reading the replication of the service's topics")?;
    let durability = config.topic_durability;
    for (topic, found) in names.iter().zip(&found) {
        match found {
            Some(found) => tracing::info!(
                topic,
                replication_factor = found.replication_factor,
                min_insync_replicas = ?found.min_insync_replicas,
                required_replication_factor = %shown(durability.required_replication_factor()),
                required_min_insync_replicas = %shown(durability.required_min_insync_replicas()),
                "topic replication"
            ),
            None => tracing::warn!(
                topic,
                "topic not found after creating it; its replication is not checked"
            ),
        }
    }
    let problems = durability_problems(durability, names.iter().copied().zip(found));
    if !problems.is_empty() {
        bail!(
            "the service's topics are less durable than configured: {} (raise the topics' \
             replication or min.insync.replicas with Kafka's tools, or lower the setting)",
            problems.join("; ")
        );
    }
    Ok(())
}

/// What the topics lack of `durability`: one sentence per setting they
/// fall short of, naming it, what it requires and each topic below it with
/// what it has.
fn durability_problems<'a>(
    durability: herald_kafka::TopicDurability,
    found: impl IntoIterator<Item = (&'a str, Option<herald_kafka::TopicReplicas>)>,
) -> Vec<String> {
    use herald_kafka::Shortfall;
    let (mut replicas, mut in_sync) = (Vec::new(), Vec::new());
    for (topic, found) in found {
        let Some(found) = found else { continue };
        for shortfall in durability.shortfalls(&found) {
            match shortfall {
                Shortfall::ReplicationFactor { has, .. } => {
                    replicas.push(format!("{topic} has {has}"));
                }
                Shortfall::MinInsyncReplicas { has, .. } => {
                    in_sync.push(format!("{topic} has {}", shown(has)));
                }
            }
        }
    }
    let mut problems = Vec::new();
    if let (Some(required), false) = (
        durability.required_replication_factor(),
        replicas.is_empty(),
    ) {
        problems.push(format!(
            "{REPLICATION_FACTOR_SETTING} requires replication factor {required}, but topic {}",
            replicas.join(", topic ")
        ));
    }
    if let (Some(required), false) = (
        durability.required_min_insync_replicas(),
        in_sync.is_empty(),
    ) {
        problems.push(format!(
            "{MIN_INSYNC_SETTING} requires min.insync.replicas {required}, but topic {}",
            in_sync.join(", topic ")
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_kafka::{TopicDurability, TopicReplicas};

    fn replicas(replication_factor: usize, min_insync: u16) -> Option<TopicReplicas> {
        Some(TopicReplicas {
            replication_factor,
            min_insync_replicas: Some(min_insync),
        })
    }

    #[test]
    fn problems_name_the_topic_what_it_has_what_is_required_and_the_setting() {
        let required = TopicDurability::cluster_default()
            .replication_factor(3)
            .min_insync_replicas(2);
        let problems = durability_problems(
            required,
            [
                ("order-events", replicas(1, 1)),
                ("dlq", replicas(2, 2)),
                ("fulfillment-events", replicas(3, 2)),
                ("not-there", None),
            ],
        );
        assert_eq!(
            problems,
            [
                format!(
                    "{REPLICATION_FACTOR_SETTING} requires replication factor 3, but topic \
                     order-events has 1, topic dlq has 2"
                ),
                format!(
                    "{MIN_INSYNC_SETTING} requires min.insync.replicas 2, but topic \
                     order-events has 1"
                ),
            ]
        );
    }

    #[test]
    fn the_cluster_defaults_accept_any_topic() {
        let problems = durability_problems(
            TopicDurability::cluster_default(),
            [("order-events", replicas(1, 1))],
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn the_settings_refuse_more_in_sync_replicas_than_replicas() {
        let error = super::super::config::topic_durability(Some(2), Some(3))
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("ORDERS_TOPIC_MIN_INSYNC_REPLICAS")
                && error.contains("ORDERS_TOPIC_REPLICATION_FACTOR"),
            "{error}"
        );
        let durability = super::super::config::topic_durability(Some(3), None).expect("valid");
        assert_eq!(durability.required_replication_factor(), Some(3));
        assert_eq!(durability.required_min_insync_replicas(), None);
        assert!(super::super::config::topic_durability(None, None)
            .expect("valid")
            .is_cluster_default());
    }
}
