//! `herald-bench publisher`: herald's [`Publisher`] (typed events encoded to
//! envelopes, sent with `publish_batch`) against a bare rdkafka
//! `BaseProducer` loop with the same librdkafka settings
//! ([`PRODUCER_DEFAULTS`]) sending records of the same keys, bodies and
//! header sizes; Kafka's own ProducerPerformance on the same broker is the
//! ceiling. Each side publishes to its own fresh topic and is timed from its
//! first send to the acknowledgement of its last record.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{ArgAction, Args};
use herald_kafka::publisher::PRODUCER_DEFAULTS;
use herald_kafka::{Publisher, PublisherConfig};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::SideSpec as AnySide;
use crate::shared::child::{run_side as run_child, SideResult};
use crate::shared::kafka_perf::KafkaTools;
use crate::shared::report::{Comparison, Round};
use crate::shared::stats::{per_second, Side};
use crate::shared::topics::{learn_topic, RunResources};
use crate::shared::workload::{publish, Workload, SOURCE};
use crate::shared::{progress, CommonArgs};

/// The ratio herald's publisher should reach.
pub const GOAL: f64 = 0.9;

/// Flags of `herald-bench publisher`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct PublisherArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    /// Events per `publish_batch` call.
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
    /// `publish_batch` calls in flight at once (1: each batch waits for the
    /// previous one's acknowledgements).
    #[arg(long, default_value_t = 1)]
    pub batches_in_flight: usize,
    /// Whether the bare loop sends herald's header set (same names, values
    /// of the same lengths) so both sides put the same bytes on the wire.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub bare_headers: bool,
    /// The directory of Kafka's jars for ProducerPerformance
    /// [default: the repository's newest .cache/kafka/libs-<version>/].
    #[arg(long)]
    pub kafka_libs: Option<PathBuf>,
    /// Skip the Kafka ProducerPerformance ceiling.
    #[arg(long)]
    pub no_kafka_perf: bool,
}

/// One side of the publisher benchmark, as a child runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    args: PublisherArgs,
    side: Side,
    topic: String,
}

/// Runs the rounds and returns the comparison.
pub async fn run(args: &PublisherArgs, resources: &RunResources) -> anyhow::Result<Comparison> {
    let common = &args.common;
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(
        args.batches_in_flight > 0,
        "--batches-in-flight must be at least 1"
    );
    let tools = if args.no_kafka_perf {
        None
    } else {
        Some(KafkaTools::locate(args.kafka_libs.clone())?)
    };
    let mut setup = common.setup();
    setup.insert("batch".into(), json!(args.batch));
    setup.insert("batches_in_flight".into(), json!(args.batches_in_flight));
    setup.insert("bare_headers".into(), json!(args.bare_headers));
    if let Some(tools) = &tools {
        setup.insert(
            "kafka_libs".into(),
            json!(tools.libs().display().to_string()),
        );
    }
    let mut comparison = Comparison {
        bench: "publisher",
        herald_side: format!(
            "herald Publisher::publish_batch of typed events ({} per batch, {} in flight), PRODUCER_DEFAULTS",
            args.batch, args.batches_in_flight
        ),
        bare_side: format!(
            "rdkafka BaseProducer send loop, PRODUCER_DEFAULTS, same keys and bodies{}",
            if args.bare_headers { ", same header sizes" } else { ", no headers" }
        ),
        goal: GOAL,
        ceiling: tools.as_ref().map(|_| "kafka ProducerPerformance".to_owned()),
        setup,
        rounds: Vec::new(),
        notes: Vec::new(),
    };
    for round in 0..common.rounds {
        let mut figures = Round::run("publisher", round, async |side| {
            let what = format!("pub-r{}-{}", round + 1, side.name());
            let spec = SideSpec {
                args: args.clone(),
                side,
                topic: resources.topic(&what, common.partitions).await?,
            };
            run_child(&AnySide::Publisher(spec), common.side_timeout_secs, &[]).await
        })
        .await?;
        if let Some(tools) = &tools {
            let topic = resources
                .topic(&format!("pub-r{}-kafka-perf", round + 1), common.partitions)
                .await?;
            let (brokers, records, size) =
                (common.brokers.clone(), common.records, common.payload_bytes);
            let tools = tools.clone();
            let perf = tokio::task::spawn_blocking(move || {
                tools.producer_perf(&brokers, &topic, records, size)
            })
            .await
            .context("waiting for ProducerPerformance")??;
            progress(format!(
                "publisher round {} kafka ProducerPerformance: {} rec/s",
                round + 1,
                per_second(perf)
            ));
            figures.ceiling_rate = Some(perf);
        }
        comparison.rounds.push(figures);
    }
    Ok(comparison)
}

/// Runs one side in this (child) process.
pub async fn run_side(spec: SideSpec) -> anyhow::Result<SideResult> {
    let workload = spec.args.common.workload()?;
    match spec.side {
        Side::Herald => herald_side(&spec, &workload).await,
        Side::Bare => tokio::task::spawn_blocking(move || bare_side(&spec, &workload))
            .await
            .context("bare side panicked")?,
    }
}

async fn herald_side(spec: &SideSpec, workload: &Workload) -> anyhow::Result<SideResult> {
    let (args, records) = (&spec.args, spec.args.common.records);
    let publisher = Publisher::new(&PublisherConfig::new(&args.common.brokers, SOURCE))?;
    learn_topic(publisher.producer().client(), &spec.topic)?;
    let start = Instant::now();
    let acknowledged = publish(
        &publisher,
        workload,
        &spec.topic,
        records,
        args.batch,
        args.batches_in_flight,
    )
    .await
    .map_err(|error| anyhow::anyhow!("herald publish failed: {error}"))?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        acknowledged == records,
        "{acknowledged} of {records} acknowledged"
    );
    SideResult::finish(records, seconds)
}

/// Counts the bare producer's delivery reports.
#[derive(Default)]
struct Deliveries {
    acknowledged: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self
                    .first_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

fn bare_side(spec: &SideSpec, workload: &Workload) -> anyhow::Result<SideResult> {
    let records = spec.args.common.records;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &spec.args.common.brokers);
    for (k, v) in PRODUCER_DEFAULTS {
        config.set(*k, *v);
    }
    let producer: BaseProducer<Deliveries> = config
        .create_with_context(Deliveries::default())
        .context("creating the bare producer")?;
    learn_topic(producer.client(), &spec.topic)?;
    let mut key = String::new();
    let mut payload = Vec::with_capacity(workload.payload_bytes() + 16);
    let mut id_buf = Uuid::encode_buffer();
    let start = Instant::now();
    for i in 0..records {
        workload.key(i, &mut key);
        let event_id = Uuid::new_v4();
        let event_id = &*event_id.hyphenated().encode_lower(&mut id_buf);
        workload.bare_payload(i, event_id, &key, &mut payload);
        let mut record = BaseRecord::to(&spec.topic)
            .key(key.as_str())
            .payload(payload.as_slice());
        if spec.args.bare_headers {
            record = record.headers(workload.bare_headers(event_id, &key));
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(1));
                }
                Err((error, _)) => bail!("bare send failed: {error}"),
            }
        }
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the bare producer")?;
    let seconds = start.elapsed().as_secs_f64();
    let deliveries = producer.context();
    if let Some(error) = deliveries
        .first_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .as_ref()
    {
        bail!(
            "{} bare deliveries failed, the first: {error}",
            deliveries.failed.load(Ordering::Relaxed)
        );
    }
    let acknowledged = deliveries.acknowledged.load(Ordering::Relaxed);
    ensure!(
        acknowledged == records,
        "{acknowledged} of {records} acknowledged"
    );
    SideResult::finish(records, seconds)
}
