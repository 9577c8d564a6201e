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
