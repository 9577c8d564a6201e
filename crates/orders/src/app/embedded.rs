//! The embedded development mode's Kafka: librdkafka's in-process mock
//! cluster.

use anyhow::Context;

/// librdkafka's in-process mock cluster, kept on a thread of its own (the
/// handle is not `Send`); it stops when this value drops.
pub struct EmbeddedKafka {
    bootstrap_servers: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Starts a one-broker mock cluster with `topics` (name, partitions).
    pub fn start(topics: Vec<(String, i32)>) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".to_owned())
            .spawn(move || {
                match rdkafka::mocking::MockCluster::new(1) {
                    Ok(cluster) => {
                        // The mock has no admin API worth the name: create
                        // the topics on the cluster itself.
                        for (topic, partitions) in &topics {
                            if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                        let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                        // Until the application drops its handle.
                        let _ = stopped.recv();
                        drop(cluster);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the embedded Kafka thread")?;
        let bootstrap_servers = ready_rx
            .recv()
            .context("the embedded Kafka thread died")?
            .context("starting librdkafka's in-process mock cluster")?;
        Ok(Self {
            bootstrap_servers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
