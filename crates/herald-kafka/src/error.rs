//! Errors of the Kafka crate, and the classification of librdkafka error codes
//! into retriable and fatal.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use uuid::Uuid;

/// Whether an operation that failed with `code` may succeed if tried again.
///
/// Retriable: the broker or network was briefly unavailable, a leader moved,
/// a queue was full, a timeout passed. Everything else (authorization,
/// oversized or invalid records, fencing, fatal idempotence errors, bad
/// configuration) needs a human or a restart, so it is fatal.
pub fn is_retriable_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut
            | C::QueueFull
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::OperationTimedOut
            | C::TimedOutQueue
            | C::WaitCache
            | C::UnknownPartition
            | C::UnknownTopicOrPartition
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::RequestTimedOut
            | C::BrokerNotAvailable
            | C::ReplicaNotAvailable
            | C::NetworkException
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
            | C::CoordinatorLoadInProgress
            | C::RebalanceInProgress
            | C::KafkaStorageError
            | C::FetchSessionIdNotFound
            | C::InvalidFetchSessionEpoch
            | C::ConcurrentTransactions
            | C::OffsetNotAvailable
            | C::PreferredLeaderNotAvailable
            | C::ThrottlingQuotaExceeded
            | C::UnstableOffsetCommit
            | C::NotController
            | C::Retry
    )
}

/// Error codes that mean another producer with our `transactional.id` won.
pub(crate) fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionCoordinatorFenced
    )
}

/// Whether a [`KafkaError`] may succeed if tried again.
pub fn is_retriable(error: &KafkaError) -> bool {
    match error {
        KafkaError::Canceled => false,
        other => other.rdkafka_error_code().is_some_and(is_retriable_code),
    }
}

/// Whether `code` refuses one record for what it is: its size, its
/// contents, its topic's policy or access rules.
pub fn is_refusal_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::PolicyViolation
            | C::TopicAuthorizationFailed
    )
}

/// Why a record could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The event could not be serialized.
    #[error(transparent)]
    Encode(#[from] herald::EncodeError),
    /// Kafka did not acknowledge the record.
    #[error("publishing event {event_id} to {topic} failed ({}): {source}", if *.retriable { "retriable" } else { "fatal" })]
    Kafka {
        /// The target topic.
        topic: String,
        /// The event that was not published.
        event_id: Uuid,
        /// Whether trying again may succeed.
        retriable: bool,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// Not sent: an earlier record of the same call with the same topic and
    /// key could not be enqueued, and this one must not overtake it.
    #[error(
        "event {event_id} to {topic} held back behind an earlier record of its key that failed"
    )]
    HeldBack {
        /// The target topic.
        topic: String,
        /// The event that was not sent.
        event_id: Uuid,
    },
}

impl PublishError {
    /// Whether trying again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            PublishError::Encode(_) => false,
            PublishError::Kafka { retriable, .. } => *retriable,
            PublishError::HeldBack { .. } => true,
        }
    }

    /// Whether the broker or the client refused this very record for good
    /// (too large, invalid, not authorized for its topic): sending it again
    /// the same way cannot succeed. Not for records held back behind
    /// another, nor for those a failing transaction took down with it.
    pub fn is_refusal(&self) -> bool {
        match self {
            PublishError::Kafka { source, .. } => {
                source.rdkafka_error_code().is_some_and(is_refusal_code)
            }
            PublishError::Encode(_) | PublishError::HeldBack { .. } => false,
        }
    }
}

/// Why a Kafka client could not be created or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// librdkafka rejected the configuration; the message names the setting.
    #[error("invalid Kafka client configuration: {0}")]
    Config(#[source] KafkaError),
    /// A builder value is out of range.
    #[error("invalid setting {setting}: {reason}")]
    Setting {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A Kafka operation failed.
    #[error("{operation} failed: {source}")]
    Kafka {
        /// What herald was doing.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The thread that polls Kafka could not start, or panicked.
    #[error("the poll thread: {0}")]
    Thread(String),
    /// The consumer's scheduler (the task that runs its records) ended
    /// before the consumer did: its tokio runtime shut down under it.
    #[error("the consumer's scheduler stopped: {0}")]
    Scheduler(String),
    /// A store the consumer reads from failed (its stored offsets,
    /// [`crate::ConsumerConfig::offsets_in`]).
    #[error("{operation} failed: {reason}")]
    Store {
        /// What herald was doing.
        operation: &'static str,
        /// The store's error, as text.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_codes_into_retriable_and_fatal() {
        assert!(is_retriable_code(RDKafkaErrorCode::MessageTimedOut));
        assert!(is_retriable_code(RDKafkaErrorCode::NotLeaderForPartition));
        assert!(is_retriable_code(RDKafkaErrorCode::AllBrokersDown));
        assert!(!is_retriable_code(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!is_retriable_code(
            RDKafkaErrorCode::TopicAuthorizationFailed
        ));
        assert!(!is_retriable_code(RDKafkaErrorCode::InvalidProducerEpoch));
        assert!(!is_retriable_code(RDKafkaErrorCode::Fatal));
        assert!(is_retriable(&KafkaError::MessageProduction(
            RDKafkaErrorCode::QueueFull
        )));
        assert!(!is_retriable(&KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidMessage
        )));
    }
}
