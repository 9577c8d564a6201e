//! Servers of a test's own, to crash: a Kafka broker and a PostgreSQL
//! cluster started for one test on free loopback ports, from the same
//! installation `scripts/services.sh up` made (the Kafka jars under
//! `.cache/kafka/libs-*`, Debian's PostgreSQL binaries), so a test can kill
//! them (SIGKILL, immediate stop) and start them again without disturbing
//! the shared services every other test uses. Each lives in a temporary
//! folder that is removed with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, FaultProxy};

/// A fresh temporary folder, owned by `owner` when given.
pub(crate) fn scratch(prefix: &str, owner: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    if let Some(owner) = owner {
        run(
            Command::new("chown").arg("-R").arg(owner).arg(&dir),
            "chown",
        );
    }
    dir
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The repository's root (this crate is `crates/herald-test`).
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The newest complete set of Kafka jars `scripts/services.sh up` fetched
/// (`.cache/kafka/libs-<version>/`), if any.
pub fn kafka_libs() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(repository().join(".cache/kafka"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libs-"))
                && p.join(".complete").exists()
        })
        .collect();
    found.sort();
    found.pop()
}

/// `java` with `options`, the Kafka tools' quiet logging and the jars in
/// `libs` on the class path; the main class and its arguments follow.
pub fn kafka_java(libs: &Path, options: &[&str]) -> Command {
    let mut java = Command::new("java");
    java.args(options)
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            repository()
                .join("scripts/kafka/tools-log4j2.properties")
                .display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()));
    java
}

/// One Kafka server process of a test's own: its folder (the
/// `server.properties` and the data), its plaintext port and the running
/// JVM. [`PrivateKafka`] is one of these; a
/// [`PrivateKafkaCluster`](crate::cluster::PrivateKafkaCluster) is three.
#[derive(Debug)]
pub(crate) struct KafkaNode {
    dir: PathBuf,
    libs: PathBuf,
    port: u16,
    process: Option<Child>,
}

impl KafkaNode {
    /// A node that will run from `dir` (where its `server.properties` is
    /// written before it starts) and listen for clients on `port`.
    pub(crate) fn new(dir: PathBuf, libs: PathBuf, port: u16) -> KafkaNode {
        KafkaNode {
            dir,
            libs,
            port,
            process: None,
        }
    }

    /// The newest Kafka jars, or a panic telling how to get them.
    pub(crate) fn libs() -> PathBuf {
        kafka_libs().unwrap_or_else(|| {
            panic!(
                "no Kafka jars under {}: run scripts/services.sh up",
                repository().join(".cache/kafka").display()
            )
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `127.0.0.1:port` of its plaintext listener.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn write_properties(&self, properties: &str) {
        std::fs::write(self.properties(), properties).expect("server.properties");
    }

    pub(crate) fn properties(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    /// Runs a Kafka tool (a main class and its arguments) and returns what
    /// it printed; panics with its errors when it fails.
    pub(crate) fn tool(&self, args: &[&str]) -> String {
        let output = kafka_java(&self.libs, &["-Xmx256m"])
            .args(args)
            .output()
            .expect("a Kafka tool");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the JVM (after killing any it has) without waiting.
    pub(crate) fn spawn(&mut self) {
        self.kill();
        let log = self.dir.join("server.out");
        let _ = std::fs::remove_file(&log);
        let out = std::fs::File::create(&log).expect("broker log");
        let process = kafka_java(&self.libs, &["-Xms256m", "-Xmx512m", "-XX:+UseG1GC"])
            .arg("kafka.Kafka")
            .arg(self.properties())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("java kafka.Kafka");
        self.process = Some(process);
    }

    /// Waits until the node answers a metadata request on its own port
    /// that lists every broker of `expected` (node ids) as registered.
    pub(crate) fn wait_answering(&mut self, expected: &[i32]) {
        let address = self.address();
        let start = Instant::now();
        let limit = Duration::from_secs(120);
        loop {
            if crate::reachable(&address) && {
                let listed = metadata_brokers(&address);
                expected.iter().all(|id| listed.contains(id))
            } {
                return;
            }
            assert!(
                self.is_running(),
                "the private Kafka node on {address} exited while starting: {}",
                self.log_tail(30)
            );
            assert!(
                start.elapsed() < limit,
                "the private Kafka node on {address} not ready after {limit:?}: {}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL (no shutdown of any kind); waits for the process to end.
    pub(crate) fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// SIGTERM: Kafka's shutdown hook runs a controlled shutdown (the
    /// controller moves its partitions' leadership away first). Waits up to
    /// `limit` for the process to end, then kills it; returns whether it
    /// ended by itself.
    pub(crate) fn terminate(&mut self, limit: Duration) -> bool {
        let Some(mut process) = self.process.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(process.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if matches!(process.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = process.kill();
        let _ = process.wait();
        false
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| matches!(process.try_wait(), Ok(None)))
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        crate::log_tail(&self.dir.join("server.out"), lines)
    }

    pub(crate) fn signal(&self, signal: &str) {
        if let Some(process) = &self.process {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(process.id().to_string())
                .status()
                .expect("kill");
            assert!(status.success(), "kill -{signal} of the broker");
        }
    }
}

impl Drop for KafkaNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The node ids of the brokers the broker at `address` lists in its
/// metadata (none when it does not answer within two seconds): asked on its
/// own port, so the check does not depend on a proxy's faults.
pub(crate) fn metadata_brokers(address: &str) -> Vec<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let Ok(consumer) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", address)
        .create::<BaseConsumer>()
    else {
        return Vec::new();
    };
    consumer
        .fetch_metadata(None, Duration::from_secs(2))
        .map_or_else(
            |_| Vec::new(),
            |m| m.brokers().iter().map(|b| b.id()).collect(),
        )
}

/// A single-node KRaft Kafka broker of one test's own.
#[derive(Debug)]
pub struct PrivateKafka {
    node: KafkaNode,
    /// The proxy the broker advertises, when started behind one.
    proxy: Option<FaultProxy>,
}

impl PrivateKafka {
    /// Formats and starts a broker on free ports; waits until it answers.
    /// Needs the jars `scripts/services.sh up` fetched.
    pub fn start() -> PrivateKafka {
        Self::start_with(false)
    }

    /// As [`PrivateKafka::start`], with a [`FaultProxy`] in front that the
    /// broker advertises as its address: clients that bootstrap from
    /// [`PrivateKafka::brokers`] reach it only through the proxy (every
    /// connection librdkafka makes, metadata included), so
    /// [`PrivateKafka::proxy`] can cut, black-hole or delay them all.
    pub fn start_behind_proxy() -> PrivateKafka {
        Self::start_with(true)
    }

    fn start_with(proxied: bool) -> PrivateKafka {
        let (port, controller) = (free_port(), free_port());
        let node = KafkaNode::new(scratch("private-kafka", None), KafkaNode::libs(), port);
        let proxy =
            proxied.then(|| FaultProxy::start_on(free_port(), &format!("127.0.0.1:{port}")));
        let advertised = proxy.as_ref().map_or(port, |p| p.address().port());
        // Timed-out transactions are looked for every second (the broker's
        // default is 10 s): sooner after a restart, before the broker's
        // metadata is loaded, which is when the coordinator completes an
        // abort without some of its markers (see herald-kafka's `sweep`
        // module). The faults tests must meet that case, not miss it.
        node.write_properties(&format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{advertised}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=3\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=3\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=3\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n",
            data = node.dir().join("data").display(),
        ));
        let id = node.tool(&["kafka.tools.StorageTool", "random-uuid"]);
        let config = node.properties();
        let _ = node.tool(&[
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            id.trim(),
            "-c",
            &config.to_string_lossy(),
        ]);
        let mut kafka = PrivateKafka { node, proxy };
        kafka.restart();
        kafka
    }

    /// `host:port` of the broker as clients reach it (its proxy's, when
    /// started behind one).
    pub fn brokers(&self) -> String {
        match &self.proxy {
            Some(proxy) => proxy.address().to_string(),
            None => self.node.address(),
        }
    }

    /// The proxy in front of the broker.
    ///
    /// # Panics
    /// When it was not started with [`PrivateKafka::start_behind_proxy`].
    pub fn proxy(&self) -> &FaultProxy {
        self.proxy
            .as_ref()
            .expect("a broker started with PrivateKafka::start_behind_proxy")
    }

    /// A client configuration for this broker.
    pub fn config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", self.brokers());
        config
    }

    /// Kills the broker with SIGKILL (no shutdown of any kind).
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Whether the broker's process is alive (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.node.is_running()
    }

    /// The last `lines` lines of the broker's log: for a failing test to
    /// print what the broker was doing.
    pub fn log_tail(&self, lines: usize) -> String {
        self.node.log_tail(lines)
    }

    /// Pauses the broker (SIGSTOP): its connections stay open and answer
    /// nothing, as a stalled host's or a GC pause's would.
    pub fn pause(&self) {
        self.node.signal("STOP");
    }

    /// Resumes a paused broker (SIGCONT).
    pub fn resume(&self) {
        self.node.signal("CONT");
    }

    /// Starts the broker (again, after [`PrivateKafka::kill`]) on the same
    /// ports and data, and waits until it has started.
    pub fn restart(&mut self) {
        self.node.spawn();
        self.node.wait_answering(&[1]);
    }
}

/// A PostgreSQL cluster of one test's own (run as the `postgres` user, as
/// `scripts/services.sh` runs the shared one), with a database `herald`
/// owned by a role `herald`.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Initializes and starts a cluster on a free port; waits until it
    /// accepts connections.
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                let mut found: Vec<PathBuf> = versions
                    .filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|b| b.join("pg_ctl").exists())
                    .collect();
                found.sort();
                found.pop()
            })
            .expect("PostgreSQL binaries under /usr/lib/postgresql: run scripts/services.sh up");
        let dir = scratch("private-postgres", Some("postgres"));
        let postgres = PrivatePostgres {
            dir,
            bin,
            port: free_port(),
        };
        run(
            postgres
                .as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(postgres.data()),
            "initdb",
        );
        postgres.restart();
        run(
            postgres.as_postgres("psql").args([
                "-h",
                "127.0.0.1",
                "-p",
                &postgres.port.to_string(),
                "-U",
                "postgres",
                "-c",
                "CREATE ROLE herald LOGIN PASSWORD 'herald' SUPERUSER",
                "-c",
                "CREATE DATABASE herald OWNER herald",
            ]),
            "creating the herald role and database",
        );
        postgres
    }

    /// The URL of its `herald` database.
    pub fn url(&self) -> String {
        format!("postgres://herald:herald@127.0.0.1:{}/herald", self.port)
    }

    /// `pg_ctl stop -m immediate`: the server ends at once, without a
    /// checkpoint, as in a crash; it recovers from its WAL at the next start.
    pub fn crash(&self) {
        run(
            self.as_postgres("pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(self.data()),
            "pg_ctl stop -m immediate",
        );
    }

    /// Starts the server (again, after [`PrivatePostgres::crash`]) and waits
    /// until it accepts connections.
    pub fn restart(&self) {
        run(
            self.as_postgres("pg_ctl")
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
                    self.port,
                    self.dir.display()
                )),
            "pg_ctl start",
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .stdin(Stdio::null());
        command
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
