//! Benchmark topics: created fresh with random names for one run, deleted
//! (with the consumer groups the run used) at its end.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, TopicResult};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::ClientConfig;

/// Fetches `topic`'s metadata through `client`: a producer that learns its
/// partitions before the clock starts does not measure the lookup.
pub fn learn_topic<C: ClientContext>(client: &Client<C>, topic: &str) -> anyhow::Result<()> {
    client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("fetching the topic's metadata")?;
    Ok(())
}

/// The topics and groups of one benchmark run.
pub struct RunResources {
    config: ClientConfig,
    admin: AdminClient<DefaultClientContext>,
    metadata: BaseConsumer,
    run_id: String,
    topics: Mutex<Vec<String>>,
    groups: Mutex<Vec<String>>,
    prefixes: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RunResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunResources")
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RunResources {
    /// Connects the admin client to `brokers`; names get a random run id.
    pub fn new(brokers: &str) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        let admin = config.create().context("creating the admin client")?;
        let metadata = config.create().context("creating the metadata client")?;
        let run_id: String = format!("{:08x}", rand::thread_rng().gen::<u32>());
        Ok(Self {
            config,
            admin,
            metadata,
            run_id,
            topics: Mutex::new(Vec::new()),
            groups: Mutex::new(Vec::new()),
            prefixes: Mutex::new(Vec::new()),
        })
    }

    /// A fresh name `herald-bench-<run>-<what>` (not yet created).
    pub fn name(&self, what: &str) -> String {
        format!("herald-bench-{}-{what}", self.run_id)
    }

    /// The run's random id (also in every name).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Deletes every topic and consumer group whose name starts with
    /// `prefix` at the end of the run: for a service the benchmark starts,
    /// whose set of topics and groups is its own business.
    pub fn adopt_prefix(&self, prefix: &str) {
        lock(&self.prefixes).push(prefix.to_owned());
    }

    /// Topics and groups of the broker named with an adopted prefix.
    fn prefixed(&self) -> (Vec<String>, Vec<String>) {
        let prefixes = lock(&self.prefixes).clone();
        if prefixes.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let matching = |listed: KafkaResult<Vec<String>>, what: &str| match listed {
            Ok(names) => names
                .into_iter()
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
                .collect(),
            Err(e) => {
                super::progress(format!("could not list {what}: {e}"));
                Vec::new()
            }
        };
        let timeout = Duration::from_secs(10);
        let topics = self.metadata.fetch_metadata(None, timeout).map(|metadata| {
            metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .collect()
        });
        let groups = self
            .metadata
            .fetch_group_list(None, timeout)
            .map(|list| list.groups().iter().map(|g| g.name().to_owned()).collect());
        (matching(topics, "topics"), matching(groups, "groups"))
    }

    /// A consumer group name, deleted at the end of the run.
    pub fn group(&self, what: &str) -> String {
        let name = self.name(what);
        lock(&self.groups).push(name.clone());
        name
    }

    /// Creates topic `herald-bench-<run>-<what>` with `partitions`
    /// (replication 1) and waits until every partition has a leader.
    pub async fn topic(&self, what: &str, partitions: i32) -> anyhow::Result<String> {
        let name = self.name(what);
        // Deleted at the end even when the request fails half-way.
        lock(&self.topics).push(name.clone());
        herald_test::try_create_topic(&self.config, &name, partitions)
            .await
            .with_context(|| format!("creating topic {name}"))?;
        self.wait_for_leaders(&name, partitions)?;
        Ok(name)
    }

    fn wait_for_leaders(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .metadata
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("topic {topic} has no leader for every partition after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Deletes every topic and group this run created; failures are
    /// reported on stderr, not raised (the benchmark's result stands).
    pub async fn cleanup(&self) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let (prefixed_topics, prefixed_groups) = self.prefixed();
        let groups = names(&self.groups, prefixed_groups);
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        if !groups.is_empty() {
            report_failures("group", self.admin.delete_groups(&groups, &options).await);
        }
        let topics = names(&self.topics, prefixed_topics);
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        if !topics.is_empty() {
            report_failures("topic", self.admin.delete_topics(&topics, &options).await);
        }
    }
}

/// The names taken from `recorded`, with `more`, sorted and without repeats.
fn names(recorded: &Mutex<Vec<String>>, more: Vec<String>) -> Vec<String> {
    let mut names = std::mem::take(&mut *lock(recorded));
    names.extend(more);
    names.sort();
    names.dedup();
    names
}

/// Reports on stderr each `what` (topic, group) a deletion failed for.
fn report_failures(what: &str, result: KafkaResult<Vec<TopicResult>>) {
    match result {
        Ok(results) => {
            for (name, code) in results.into_iter().filter_map(Result::err) {
                super::progress(format!("could not delete {what} {name}: {code}"));
            }
        }
        Err(e) => super::progress(format!("could not delete {what}s: {e}")),
    }
}
