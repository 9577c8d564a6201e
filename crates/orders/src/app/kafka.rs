//! The service's topics on Kafka: which it needs (with their partitions and
//! which keep state), creating them, and the start-up check that the
//! cluster answers with the configured settings.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::Config;

/// The topics that keep state: the fulfillment processor's two changelogs
/// and its completed ids, and the consumers' parked-key table. Compacted,
/// one partition each.
fn state_topics(config: &Config) -> [String; 4] {
    let [stock, reservations] = crate::fulfillment::changelog_topics(&config.fulfillment_topic);
    [
        stock,
        reservations,
        crate::fulfillment::completed_topic(&config.fulfillment_topic),
        herald_kafka::parking::DEFAULT_PARKED_TOPIC.to_owned(),
    ]
}

/// The service's topics with their partitions, the processor's state last.
pub(super) fn topic_plan(config: &Config) -> Vec<(String, i32)> {
    let mut plan = vec![
        (config.topics.events.clone(), config.partitions),
        (format!("{}.dlq", config.topics.events), config.partitions),
        (config.fulfillment_topic.clone(), config.partitions),
    ];
    plan.extend(state_topics(config).map(|topic| (topic, 1)));
    plan
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

/// Creates the service's topics if they do not exist.
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .kafka_client_config()
        .create()
        .context("creating the Kafka admin client (check --kafka-setting)")?;
    let plan = topic_plan(config);
    let compacted = state_topics(config);
    let topics: Vec<NewTopic> = plan
        .iter()
        .map(|(name, partitions)| {
            let topic = NewTopic::new(name, *partitions, TopicReplication::Fixed(-1));
            // State: compacted, so the latest value per key stays.
            if compacted.contains(name) {
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
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}
