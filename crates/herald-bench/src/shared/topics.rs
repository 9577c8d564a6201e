//! Benchmark topics: created fresh with random names for one run, deleted
//! (with the consumer groups the run used) at its end.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The topics and groups of one benchmark run.
pub struct RunResources {
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
        let matches = |name: &str| prefixes.iter().any(|p| name.starts_with(p.as_str()));
        let topics = match self.metadata.fetch_metadata(None, Duration::from_secs(10)) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|n| matches(n))
                .collect(),
            Err(e) => {
                super::progress(format!("could not list topics: {e}"));
                Vec::new()
            }
        };
        let groups = match self
            .metadata
            .fetch_group_list(None, Duration::from_secs(10))
        {
            Ok(list) => list
                .groups()
                .iter()
                .map(|g| g.name().to_owned())
                .filter(|n| matches(n))
                .collect(),
            Err(e) => {
                super::progress(format!("could not list groups: {e}"));
                Vec::new()
            }
        };
        (topics, groups)
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
        let new = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .with_context(|| format!("creating topic {name}"))?;
        lock(&self.topics).push(name.clone());
        for result in results {
            if let Err((topic, code)) = result {
                bail!("creating topic {topic}: {code}");
            }
        }
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
        let mut groups = std::mem::take(&mut *lock(&self.groups));
        groups.extend(prefixed_groups);
        groups.sort();
        groups.dedup();
        if !groups.is_empty() {
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            match self.admin.delete_groups(&names, &options).await {
                Ok(results) => {
                    for result in results {
                        if let Err((group, code)) = result {
                            super::progress(format!("could not delete group {group}: {code}"));
                        }
                    }
                }
                Err(e) => super::progress(format!("could not delete groups: {e}")),
            }
        }
        let mut topics = std::mem::take(&mut *lock(&self.topics));
        topics.extend(prefixed_topics);
        topics.sort();
        topics.dedup();
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            match self.admin.delete_topics(&names, &options).await {
                Ok(results) => {
                    for result in results {
                        if let Err((topic, code)) = result {
                            super::progress(format!("could not delete topic {topic}: {code}"));
                        }
                    }
                }
                Err(e) => super::progress(format!("could not delete topics: {e}")),
            }
        }
    }
}
