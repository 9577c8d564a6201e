//! Runnable examples of herald's library, each started with the one
//! `cargo run -p herald-examples --example …` line at its top, on an
//! embedded Kafka where it can. `tests/examples.rs` runs each of them in
//! the test suite, so they keep working.
//!
//! # Layout
//! - `consumer.rs`: a typed consumer with retries and dead letters (and a
//!   poisoned key's next event parked behind it).
