//! The benchmarks, one module each. A benchmark has a flags struct, a `run`
//! that drives its rounds from the parent process and returns a report
//! (a [`Comparison`](crate::shared::report::Comparison) or another
//! [`Report`](crate::shared::report::Report)), and, when its sides run in
//! child processes, a `SideSpec` a child runs (one variant of [`SideSpec`]
//! here).

pub mod consumer;
pub mod inbox;
pub mod orders;
pub mod processor;
pub mod publisher;
pub mod relay;
pub mod relay_latency;

use serde::{Deserialize, Serialize};

use crate::shared::child::SideResult;

/// What a child process runs: one side of one benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "bench", rename_all = "snake_case")]
pub enum SideSpec {
    /// A side of `herald-bench publisher`.
    Publisher(publisher::SideSpec),
    /// A side of `herald-bench consumer`.
    Consumer(consumer::SideSpec),
    /// A side of `herald-bench relay`.
    Relay(relay::SideSpec),
    /// The relay of one mode of `herald-bench relay-latency`.
    RelayLatency(relay_latency::SideSpec),
    /// A side of `herald-bench inbox`.
    Inbox(inbox::SideSpec),
    /// A processor of `herald-bench processor`.
    Processor(processor::SideSpec),
}

impl SideSpec {
    /// Runs the side and returns its measurement.
    pub async fn run(self) -> anyhow::Result<SideResult> {
        match self {
            SideSpec::Publisher(spec) => publisher::run_side(spec).await,
            SideSpec::Consumer(spec) => consumer::run_side(spec).await,
            SideSpec::Relay(spec) => relay::run_side(spec).await,
            SideSpec::RelayLatency(spec) => relay_latency::run_side(spec).await,
            SideSpec::Inbox(spec) => inbox::run_side(spec).await,
            SideSpec::Processor(spec) => processor::run_side(spec).await,
        }
    }
}
