//! herald on Apache Kafka, through rdkafka (librdkafka built from the crate's
//! bundled source).
//!
//! # Layout
//! - `tests/kafka_smoke.rs`: rdkafka against the real broker.
