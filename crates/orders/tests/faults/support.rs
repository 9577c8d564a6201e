//! What the fault scenarios share: the fleet of `orders` processes, the
//! timeline a failing run prints, and clients that retry through faults.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// What happened when, for the report of a failing run.
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    pub events: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub fn note(&self, what: impl Into<String>) {
        let line = format!(
            "{:>7.2}s {}",
            self.start.elapsed().as_secs_f64(),
            what.into()
        );
        eprintln!("{line}");
        self.events.lock().expect("timeline").push(line);
    }
}

/// One `orders` process of the fleet, started again whenever it is gone.
pub struct Member {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub log: std::path::PathBuf,
}

impl Member {
    /// `orders <args>` named `name`, with the fleet's `env` plus `extra`,
    /// logging to `<log_dir>/<name>.log`; not started yet.
    pub fn new(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        extra: &[(&str, &str)],
        log_dir: &std::path::Path,
    ) -> Member {
        let mut env = env.to_vec();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Member {
            name: name.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            child: None,
            log: log_dir.join(format!("{name}.log")),
        }
    }

    /// Runs it to its end (a one-shot command such as `migrate`), which
    /// must succeed.
    pub fn run_to_success(mut self) {
        self.start();
        let status = self.child.take().expect("child").wait().expect("wait");
        assert!(status.success(), "orders {:?} failed", self.args);
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("orders");
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it ended by itself (it is then gone, to be started again).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

pub struct Fleet(pub Vec<Member>);

impl Fleet {
    /// Stops every running member gracefully; returns those that did not
    /// end with success, with how they ended.
    pub fn stop(&mut self) -> Vec<(String, Option<std::process::ExitStatus>)> {
        let (names, mut children): (Vec<String>, Vec<Child>) = self
            .0
            .iter_mut()
            .filter_map(|m| Some((m.name.clone(), m.child.take()?)))
            .unzip();
        let ended = herald_test::stop_gracefully(&mut children, Duration::from_secs(60));
        names
            .into_iter()
            .zip(ended)
            .filter(|(_, status)| !status.is_some_and(|s| s.success()))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for member in &mut self.0 {
            member.kill();
        }
    }
}

/// Sends `request()` until the API answers one of the `done` statuses,
/// through API restarts and the database's outage: a 5xx, a reset or a
/// refused connection is asked again with backoff. Any other 4xx fails the
/// test.
pub async fn until_answered(
    what: &str,
    done: &[u16],
    request: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut delay = Duration::from_millis(50);
    loop {
        match request().timeout(Duration::from_secs(10)).send().await {
            Ok(response) if done.contains(&response.status().as_u16()) => return response,
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                panic!(
                    "{what} answered {status}: {}",
                    response.text().await.unwrap_or_default()
                );
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{what}: no answer in time");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Places an order under `key` until the API accepts it (201): a retry
/// under the same Idempotency-Key never makes a second order.
pub async fn place(client: &reqwest::Client, base: &str, key: &str) -> Uuid {
    let order = serde_json::json!({
        "customer_id": Uuid::new_v4(),
        "currency": "EUR",
        "items": [
            { "sku": "BOOK-1", "quantity": 1, "unit_price": "12.50" },
            { "sku": "PEN-2", "quantity": 2, "unit_price": "0.99" }
        ]
    });
    let response = until_answered(&format!("POST /orders (key {key})"), &[201], || {
        client
            .post(format!("{base}/orders"))
            .header("idempotency-key", key)
            .json(&order)
    })
    .await;
    let body: serde_json::Value = response.json().await.expect("json");
    body["id"].as_str().expect("id").parse().expect("uuid")
}

/// Waits until the API at `base` answers `/readyz` with a success.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    herald_test::poll_until(
        "the API ready",
        Duration::from_secs(120),
        async || match client.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await;
}
