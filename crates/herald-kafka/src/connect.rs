//! A start-up check that a client configuration reaches the cluster, and,
//! when it does not, which setting to look at.
//!
//! librdkafka reports a refused login, a failed TLS handshake or a listener
//! spoken to in the wrong protocol only through its error callback; the
//! request that was waiting then fails with a bare transport error or a
//! time-out. [`check_cluster`] listens on that callback while it asks for
//! metadata, so the error it returns says what went wrong and names the
//! settings that decide it.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::ClientConfig;

/// Why a client configuration cannot talk to the cluster. The messages
/// carry librdkafka's own reason, which never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration itself is invalid (an unknown key, a bad value).
    #[error("invalid Kafka client configuration: {0}")]
    Config(#[source] KafkaError),
    /// The broker refused the SASL login.
    #[error(
        "the Kafka broker refused the SASL login (check sasl.username, sasl.password and \
         sasl.mechanism): {reason}"
    )]
    Authentication {
        /// librdkafka's reason.
        reason: String,
    },
    /// The TLS handshake failed: usually a broker certificate the client
    /// cannot verify, or a TLS client against a plaintext listener.
    #[error(
        "the TLS handshake with the Kafka broker failed (check ssl.ca.location, and that \
         security.protocol matches the listener): {reason}"
    )]
    Tls {
        /// librdkafka's reason.
        reason: String,
    },
    /// The listener did not speak Kafka's protocol the way the client
    /// does: what a plaintext client sees at a TLS or SASL listener.
    #[error(
        "the Kafka listener did not answer (check that security.protocol matches the \
         listener of bootstrap.servers): {reason}"
    )]
    Protocol {
        /// librdkafka's reason.
        reason: String,
    },
    /// No broker answered within the time allowed.
    #[error("no Kafka broker of bootstrap.servers answered within {timeout:?}{}", last_seen(.reason))]
    Unreachable {
        /// How long the check waited.
        timeout: Duration,
        /// librdkafka's last reported problem, if any.
        reason: Option<String>,
    },
}

fn last_seen(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default()
}

impl ConnectError {
    /// Whether the configuration, not the cluster's availability, is at
    /// fault: trying again with the same settings cannot succeed.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, ConnectError::Unreachable { .. })
    }
}

/// The client-wide errors librdkafka reported, the latest last.
#[derive(Default, Clone)]
struct ReportedErrors {
    latest: Arc<Mutex<Option<(RDKafkaErrorCode, String)>>>,
}

impl ReportedErrors {
    fn record(&self, code: RDKafkaErrorCode, reason: &str) {
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A diagnosis already made is not replaced by the bare transport
        // failure that follows it.
        if latest
            .as_ref()
            .is_some_and(|(code, reason)| diagnose(*code, reason).is_some())
            && diagnose(code, reason).is_none()
        {
            return;
        }
        *latest = Some((code, reason.to_owned()));
    }

    fn latest(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.latest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ProducerContext for ReportedErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl ClientContext for ReportedErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        let Some(code) = error.rdkafka_error_code() else {
            return;
        };
        // "All brokers down" follows every other failure and would hide
        // the one that says why.
        if code == RDKafkaErrorCode::AllBrokersDown {
            return;
        }
        tracing::debug!(%code, reason, "Kafka client error during the connection check");
        self.record(code, reason);
    }
}

/// What a reported error says about the configuration, if anything.
fn diagnose(code: RDKafkaErrorCode, reason: &str) -> Option<ConnectError> {
    let reason = reason.to_owned();
    match code {
        RDKafkaErrorCode::Authentication
        | RDKafkaErrorCode::SaslAuthenticationFailed
        | RDKafkaErrorCode::UnsupportedSASLMechanism
        | RDKafkaErrorCode::IllegalSASLState => Some(ConnectError::Authentication { reason }),
        RDKafkaErrorCode::SSL => Some(ConnectError::Tls { reason }),
        // librdkafka's own hint for a plaintext client at a TLS listener.
        RDKafkaErrorCode::BrokerTransportFailure if reason.contains("security.protocol") => {
            Some(ConnectError::Protocol { reason })
        }
        _ => None,
    }
}

/// A plaintext client's diagnosis when no broker answered: librdkafka
/// reports nothing at all when a TLS listener drops its plaintext request,
/// so a bootstrap address that accepts the TCP connection but never
/// answers Kafka's protocol is taken for a listener that wants TLS.
fn silent_listener(config: &ClientConfig) -> Option<ConnectError> {
    let protocol = config
        .get("security.protocol")
        .unwrap_or("plaintext")
        .to_ascii_lowercase();
    if protocol != "plaintext" && protocol != "sasl_plaintext" {
        return None;
    }
    let servers = config.get("bootstrap.servers").unwrap_or_default();
    let listening = servers.split(',').find(|server| {
        let server = server.trim();
        let server = server.rsplit_once("://").map_or(server, |(_, rest)| rest);
        server.to_socket_addrs().is_ok_and(|mut addresses| {
            addresses
                .any(|address| TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok())
        })
    })?;
    Some(ConnectError::Protocol {
        reason: format!(
            "{} accepts connections but answered no {protocol} Kafka request (a TLS \
             listener wants security.protocol SSL or SASL_SSL)",
            listening.trim()
        ),
    })
}

/// Asks the cluster at `config`'s `bootstrap.servers` for its metadata,
/// until it answers or `timeout` passes. Returns as soon as librdkafka
/// reports a refused login, a failed TLS handshake or a protocol mismatch,
/// without waiting out the time.
pub async fn check_cluster(config: &ClientConfig, timeout: Duration) -> Result<(), ConnectError> {
    let reported = ReportedErrors::default();
    // A producer, because its poll hands the error callback what librdkafka
    // queued; it never produces anything.
    let producer: BaseProducer<ReportedErrors> = config
        .create_with_context(reported.clone())
        .map_err(ConnectError::Config)?;
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        loop {
            // Short requests, so that a diagnosis ends the wait early.
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            if producer.client().fetch_metadata(None, step).is_ok() {
                return Ok(());
            }
            // Hands the error callback what librdkafka queued meanwhile
            // (one poll of zero time handles a single event).
            producer.poll(Duration::from_millis(100));
            let latest = reported.latest();
            if let Some(diagnosis) = latest
                .as_ref()
                .and_then(|(code, reason)| diagnose(*code, reason))
            {
                return Err(diagnosis);
            }
            if Instant::now() >= deadline {
                return Err(
                    silent_listener(&config).unwrap_or(ConnectError::Unreachable {
                        timeout,
                        reason: latest.map(|(code, reason)| format!("{code}: {reason}")),
                    }),
                );
            }
        }
    })
    .await
    .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_errors_name_the_setting_to_check() {
        let auth = diagnose(
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: Authentication failed",
        )
        .expect("a diagnosis");
        assert!(auth.to_string().contains("sasl.password"), "{auth}");
        let tls = diagnose(RDKafkaErrorCode::SSL, "certificate verify failed").expect("tls");
        assert!(tls.to_string().contains("ssl.ca.location"), "{tls}");
        let plain = diagnose(
            RDKafkaErrorCode::BrokerTransportFailure,
            "Disconnected while requesting ApiVersion: might be caused by incorrect \
             security.protocol configuration (connecting to a SSL listener?)",
        )
        .expect("protocol");
        assert!(plain.to_string().contains("security.protocol"), "{plain}");
        // A broker that is simply away is not a configuration problem.
        assert!(diagnose(
            RDKafkaErrorCode::BrokerTransportFailure,
            "Connection refused"
        )
        .is_none());
        assert!(!ConnectError::Unreachable {
            timeout: Duration::from_secs(1),
            reason: None
        }
        .is_configuration());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_with_the_reason() {
        // Port 1 on the loopback: nothing listens there.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1");
        let error = check_cluster(&config, Duration::from_secs(2))
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(error, ConnectError::Unreachable { .. }), "{error}");
        assert!(error.to_string().contains("bootstrap.servers"), "{error}");
    }
}
