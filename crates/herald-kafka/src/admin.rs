//! The topics herald makes for itself (the relay's checkpoints, the
//! processor's completed inputs), created at start when missing.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::error::ClientError;

/// Creates `topic`, compacted, with `partitions` partitions and the
/// cluster's default replication, unless it exists; returns how many
/// partitions it has (an existing topic keeps its own count).
pub(crate) async fn ensure_compacted_topic(
    client: &ClientConfig,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<usize, ClientError> {
    let failed = |operation| move |source| ClientError::Kafka { operation, source };
    let mut client = client.clone();
    // A metadata request for a missing topic must not make the broker
    // create it with its defaults (one partition, not compacted).
    client.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(ClientError::Config)?;
    let partitions_of = |timeout| -> Result<usize, ClientError> {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(topic), timeout)
            .map_err(failed("reading a herald topic's metadata"))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    };
    // An existing topic is used as it is (librdkafka's mock cluster, the
    // embedded mode's broker, cannot create topics at all).
    let existing = partitions_of(timeout)?;
    if existing > 0 {
        return Ok(existing);
    }
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
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
