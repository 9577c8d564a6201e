//! librdkafka configurations assembled in layers: herald's defaults, then the
//! user's pass-through settings, then whatever herald must own (later layers
//! win). Shared by the publisher, the consumer runtime and the processor.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// A client configuration for `brokers` with `layers` applied in order.
pub(crate) fn layered<'a>(
    brokers: &str,
    layers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in layers {
        config.set(key, value);
    }
    config
}

/// The entries of a settings map, as a layer.
pub(crate) fn pairs(settings: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

/// The entries of a fixed table, as a layer.
pub(crate) fn table<'a>(
    table: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = (&'a str, &'a str)> {
    table.iter().copied()
}

/// The security settings of a consumer's map (`security.*`, `sasl.*`,
/// `ssl.*`): the producers herald makes beside a consumer (dead letters,
/// transactions, changelog restores) reach the same secured cluster.
pub(crate) fn security(settings: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    pairs(settings).filter(|(k, _)| {
        k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.")
    })
}

/// A configuration's librdkafka pass-through settings. Its `Debug` shows
/// every key but the values of secrets (passwords, private keys, OAuth and
/// JAAS configurations), so a configuration can be logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Settings(BTreeMap<String, String>);

impl std::ops::Deref for Settings {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Settings {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                let shown = if is_secret(key) { "[redacted]" } else { value };
                (key, shown)
            }))
            .finish()
    }
}

/// Whether a librdkafka setting holds a secret.
fn is_secret(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key.starts_with("ssl.key.")
        || key.starts_with("ssl_key")
        || key == "sasl.jaas.config"
        || key.starts_with("sasl.oauthbearer.config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_keys_and_hides_secret_values() {
        let mut settings = Settings::default();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.username", "herald"),
            ("sasl.password", "pw-1"),
            ("ssl.key.password", "pw-2"),
            ("ssl.key.pem", "pw-3"),
            ("sasl.oauthbearer.client.secret", "pw-4"),
            ("sasl.oauthbearer.config", "pw-5"),
        ] {
            settings.insert(key.to_owned(), value.to_owned());
        }
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("SASL_SSL") && shown.contains("sasl.password"),
            "{shown}"
        );
        for secret in ["pw-1", "pw-2", "pw-3", "pw-4", "pw-5"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn the_library_configurations_debug_without_secrets() {
        let secret = "the-sasl-password-7c1e";
        let shown = [
            format!(
                "{:?}",
                crate::ConsumerConfig::new("b:9092", "group", ["topic"])
                    .set("sasl.password", secret)
                    .set_producer("sasl.password", secret)
            ),
            format!(
                "{:?}",
                crate::PublisherConfig::new("b:9092", "/source").set("sasl.password", secret)
            ),
            format!(
                "{:?}",
                crate::ProcessorConfig::new("b:9092", "group", ["topic"], "0")
                    .set("sasl.password", secret)
                    .set_producer("sasl.password", secret)
            ),
        ];
        for shown in shown {
            assert!(shown.contains("sasl.password"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
