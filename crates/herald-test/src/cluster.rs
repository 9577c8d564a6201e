//! A replicated Kafka cluster of one test's own: three KRaft nodes, each a
//! broker and a controller, whose controllers form a three-voter quorum,
//! on free loopback ports, from the jars `scripts/services.sh up` fetched.
//! It is configured as `scripts/services.sh up --kafka-nodes 3` configures
//! the shared one (replication factor 3 and `min.insync.replicas` 2 for
//! every topic, internal ones included), so a test can kill a partition's
//! leader, restart the nodes one by one, or take two of three away, and
//! watch what producers, relays and processors do.
//!
//! Starting one takes three JVMs and 20–60 s on a small machine; tests that
//! use one should take turns.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};

use crate::free_port;
use crate::private::{scratch, KafkaNode};

/// How many nodes a [`PrivateKafkaCluster`] has.
pub const NODES: i32 = 3;

/// One partition as the cluster's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The leader's node id (-1 while there is none).
    pub leader: i32,
    /// The nodes that hold a replica.
    pub replicas: Vec<i32>,
    /// The replicas in sync with the leader.
    pub in_sync: Vec<i32>,
}

/// A three-node Kafka cluster of one test's own (see the module's doc).
#[derive(Debug)]
pub struct PrivateKafkaCluster {
    dir: PathBuf,
    /// Node `n` (1-based, its `node.id`) is `nodes[n - 1]`.
    nodes: Vec<KafkaNode>,
}

impl PrivateKafkaCluster {
    /// Formats and starts three nodes on free ports and waits until every
    /// one of them answers with all three brokers in its metadata. Needs
    /// the jars `scripts/services.sh up` fetched.
    pub fn start() -> PrivateKafkaCluster {
        let dir = scratch("private-kafka-cluster", None);
        let libs = KafkaNode::libs();
        let ports: Vec<(u16, u16)> = (0..NODES).map(|_| (free_port(), free_port())).collect();
        let quorum = ports
            .iter()
            .map(|(_, controller)| format!("127.0.0.1:{controller}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes: Vec<KafkaNode> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, controller))| {
                let home = dir.join(format!("node-{}", i + 1));
                std::fs::create_dir_all(&home).expect("node folder");
                let node = KafkaNode::new(home, libs.clone(), port);
                node.write_properties(&properties(i as i32 + 1, port, controller, &quorum, &node));
                node
            })
            .collect();
        // One cluster id; each controller is named in the initial voters by
        // id, endpoint and the directory id its metadata log will have, and
        // every node is formatted with the same list.
        let first = &nodes[0];
        let cluster_id = first.tool(&["kafka.tools.StorageTool", "random-uuid"]);
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| {
                let directory = first.tool(&["kafka.tools.StorageTool", "random-uuid"]);
                format!("{}@127.0.0.1:{controller}:{}", i + 1, directory.trim())
            })
            .collect::<Vec<_>>()
            .join(",");
        for node in &nodes {
            let _ = node.tool(&[
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id.trim(),
                "--initial-controllers",
                &voters,
                "-c",
                &node.properties().to_string_lossy(),
            ]);
        }
        let mut cluster = PrivateKafkaCluster { dir, nodes };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        let all: Vec<i32> = cluster.node_ids().collect();
        for node in &mut cluster.nodes {
            node.wait_answering(&all);
        }
        cluster
    }

    /// The node ids, `1..=3`.
    pub fn node_ids(&self) -> RangeInclusive<i32> {
        1..=NODES
    }

    /// The lowest node id not among `excluded` (a survivor of a kill, say).
    /// Panics when every node is excluded.
    pub fn node_other_than(&self, excluded: &[i32]) -> i32 {
        self.node_ids()
            .find(|n| !excluded.contains(n))
            .expect("a node not excluded")
    }

    /// Every node's `host:port`, comma-separated: bootstrap servers that
    /// reach the cluster whichever nodes are down.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(KafkaNode::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The cluster as the shared-broker helpers see one: topics,
    /// `read_to_end`, committed offsets.
    pub fn kafka(&self) -> crate::Kafka {
        crate::Kafka::at(self.brokers())
    }

    /// A client configuration for this cluster.
    pub fn config(&self) -> rdkafka::ClientConfig {
        self.kafka().config()
    }

    fn node(&mut self, id: i32) -> &mut KafkaNode {
        assert!(self.node_ids().contains(&id), "no node {id} in the cluster");
        &mut self.nodes[id as usize - 1]
    }

    /// Kills node `id` with SIGKILL: no controlled shutdown, its
    /// partitions' leadership moves only once the controller notices.
    pub fn kill(&mut self, id: i32) {
        self.node(id).kill();
    }

    /// Stops node `id` as an operator would (SIGTERM: a controlled
    /// shutdown that hands its leaderships over first) and waits for it to
    /// exit. Panics when it has not exited within two minutes.
    pub fn stop(&mut self, id: i32) {
        let node = self.node(id);
        let clean = node.terminate(Duration::from_secs(120));
        assert!(
            clean,
            "node {id} did not stop within 120 s of SIGTERM: {}",
            node.log_tail(30)
        );
    }

    /// Starts node `id` again (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)) on its ports and data, and waits until it
    /// answers. It is then a broker again; its replicas catch up in the
    /// background ([`wait_in_sync`](Self::wait_in_sync) waits for that).
    pub fn start_node(&mut self, id: i32) {
        let node = self.node(id);
        node.spawn();
        // It lists itself once it has registered with the controller, which
        // needs a quorum: at least one other node must be running.
        node.wait_answering(&[id]);
    }

    /// Whether node `id`'s process is alive.
    pub fn is_running(&mut self, id: i32) -> bool {
        self.node(id).is_running()
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: i32, lines: usize) -> String {
        self.nodes[id as usize - 1].log_tail(lines)
    }

    /// Every partition of `topic` as the metadata of the running nodes has
    /// it, or the error of a cluster that does not answer in time.
    pub fn partitions(&self, topic: &str) -> Result<BTreeMap<i32, PartitionState>, String> {
        let mut all = self.metadata(Some(topic))?;
        all.remove(topic)
            .ok_or_else(|| format!("no metadata for {topic}"))
    }

    /// Every partition of `topic` (of every topic, internal ones included,
    /// when `None`), by topic.
    fn metadata(
        &self,
        topic: Option<&str>,
    ) -> Result<BTreeMap<String, BTreeMap<i32, PartitionState>>, String> {
        let consumer: BaseConsumer = self
            .config()
            .create()
            .map_err(|e| format!("metadata client: {e}"))?;
        let metadata = consumer
            .fetch_metadata(topic, Duration::from_secs(5))
            .map_err(|e| format!("metadata: {e}"))?;
        metadata
            .topics()
            .iter()
            .map(|t| {
                if let Some(error) = t.error() {
                    return Err(format!("metadata of {}: {error:?}", t.name()));
                }
                let partitions = t
                    .partitions()
                    .iter()
                    .map(|p| {
                        let state = PartitionState {
                            leader: p.leader(),
                            replicas: p.replicas().to_vec(),
                            in_sync: p.isr().to_vec(),
                        };
                        (p.id(), state)
                    })
                    .collect();
                Ok((t.name().to_owned(), partitions))
            })
            .collect()
    }

    /// The node that leads `partition` of `topic` now. Panics when the
    /// cluster does not say within two minutes.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        self.wait_for(&format!("a leader of {topic}/{partition}"), |cluster| {
            let leader = cluster.partitions(topic)?.get(&partition).map(|p| p.leader);
            match leader {
                Some(id) if id >= 1 => Ok(id),
                other => Err(format!("leader {other:?}")),
            }
        })
    }

    /// The node that coordinates consumer group `group` now: the leader of
    /// the `__consumer_offsets` partition the group id hashes to, as the
    /// broker picks it (the absolute value of Java's `String.hashCode`,
    /// modulo the partition count). Its death moves the group to another node.
    /// Panics when the cluster does not say within two minutes.
    pub fn group_coordinator(&self, group: &str) -> i32 {
        self.coordinator("__consumer_offsets", group)
    }

    /// The node that coordinates the transactions of `transactional_id`
    /// now: the leader of the `__transaction_state` partition the id hashes
    /// to (picked as [`group_coordinator`](Self::group_coordinator)'s). The
    /// topic exists once some producer has asked for a transaction
    /// coordinator. Panics when the cluster does not say within two minutes.
    pub fn transaction_coordinator(&self, transactional_id: &str) -> i32 {
        self.coordinator("__transaction_state", transactional_id)
    }

    /// The leader of the partition of internal `topic` that `id` hashes to.
    fn coordinator(&self, topic: &str, id: &str) -> i32 {
        let count = self.wait_for(
            &format!("the partitions of {topic}"),
            |cluster| match cluster.partitions(topic)?.len() {
                0 => Err(format!("{topic} has no partitions yet")),
                n => Ok(n as i32),
            },
        );
        self.leader(topic, coordinator_partition(id, count))
    }

    /// Waits until no partition of any topic (internal ones included) is
    /// under-replicated or without a leader: what an operator waits for
    /// between two steps of a rolling restart. Panics after two minutes.
    pub fn wait_in_sync(&self) {
        self.wait_for("every replica of every partition in sync", |cluster| {
            let lagging: Vec<String> = cluster
                .metadata(None)?
                .iter()
                .flat_map(|(topic, partitions)| {
                    partitions
                        .iter()
                        .filter(|(_, p)| p.leader < 1 || p.in_sync.len() < p.replicas.len())
                        .map(move |(id, p)| format!("{topic}/{id}: {p:?}"))
                })
                .collect();
            if lagging.is_empty() {
                Ok(())
            } else {
                Err(lagging.join("; "))
            }
        })
    }

    /// Waits until every partition of every topic (internal ones included)
    /// has a leader other than node `id`: the failover after
    /// [`kill`](Self::kill), before a test asks for what only a leader
    /// answers (end offsets, committed offsets). Returns how long it
    /// waited. Panics after two minutes.
    pub fn wait_failover(&self, id: i32) -> Duration {
        let start = Instant::now();
        self.wait_for(
            &format!("every leadership moved off node {id}"),
            |cluster| {
                let stranded: Vec<String> = cluster
                    .metadata(None)?
                    .iter()
                    .flat_map(|(topic, partitions)| {
                        partitions
                            .iter()
                            .filter(|(_, p)| p.leader < 1 || p.leader == id)
                            .map(move |(p, state)| format!("{topic}/{p}: {state:?}"))
                    })
                    .collect();
                if stranded.is_empty() {
                    Ok(())
                } else {
                    Err(stranded.join("; "))
                }
            },
        );
        start.elapsed()
    }

    fn wait_for<T>(&self, what: &str, mut probe: impl FnMut(&Self) -> Result<T, String>) -> T {
        let limit = Duration::from_secs(120);
        let start = Instant::now();
        loop {
            match probe(self) {
                Ok(value) => return value,
                Err(last) if start.elapsed() >= limit => {
                    panic!("{what}: not after {limit:?}; last: {last}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

impl Drop for PrivateKafkaCluster {
    fn drop(&mut self) {
        // Each node kills its JVM and removes its folder; then the rest.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The partition of a coordinator topic (`__consumer_offsets`,
/// `__transaction_state`) that holds `id`, as the broker computes it:
/// Java's `String.hashCode` of the id (UTF-16 units, wrapping), made
/// non-negative by Kafka's `Utils.abs` (the absolute value, and 0 for
/// `i32::MIN`: not the partitioner's sign-bit mask), modulo `partitions`.
fn coordinator_partition(id: &str, partitions: i32) -> i32 {
    let hash = id.encode_utf16().fold(0i32, |h, unit| {
        h.wrapping_mul(31).wrapping_add(i32::from(unit))
    });
    hash.checked_abs().unwrap_or(0) % partitions
}

/// `server.properties` of node `id`: the one-node broker's settings, made
/// a member of the quorum, with the three-node cluster's replication.
fn properties(id: i32, port: u16, controller: u16, quorum: &str, node: &KafkaNode) -> String {
    format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.bootstrap.servers={quorum}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={data}\n\
         num.partitions=3\n\
         auto.create.topics.enable=false\n\
         default.replication.factor=3\n\
         min.insync.replicas=2\n\
         unclean.leader.election.enable=false\n\
         offsets.topic.replication.factor=3\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor=3\n\
         transaction.state.log.min.isr=2\n\
         transaction.state.log.num.partitions=3\n\
         share.coordinator.state.topic.replication.factor=3\n\
         share.coordinator.state.topic.min.isr=2\n\
         group.initial.rebalance.delay.ms=0\n\
         transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n",
        data = node.dir().join("data").display(),
    )
}

#[cfg(test)]
mod tests {
    use super::coordinator_partition;

    #[test]
    fn coordinator_partitions_follow_java_string_hash_code() {
        // "hello".hashCode() == 99162322; "polygenelubricants".hashCode()
        // == Integer.MIN_VALUE, which Utils.abs makes 0.
        assert_eq!(coordinator_partition("hello", 50), 99_162_322 % 50);
        assert_eq!(coordinator_partition("polygenelubricants", 3), 0);
        // "hellohello".hashCode() == -1538739392: its absolute value
        // (partition 2 of 3), not its sign bit cleared (608744256,
        // partition 0), as checked against the broker's own tools.
        assert_eq!(coordinator_partition("hellohello", 3), 2);
        // Beyond the BMP a character is two UTF-16 units: "𝄞".hashCode()
        // == 55348 * 31 + 56606 == 1772394.
        assert_eq!(coordinator_partition("𝄞", 1000), 1_772_394 % 1000);
        assert_eq!(coordinator_partition("", 3), 0);
    }
}
