//! What the fault scenarios share: the fleet of `orders` processes, the
//! timeline a failing run prints, and clients that retry through faults.

use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use std::collections::{BTreeMap, BTreeSet};

use orders::fulfillment::FulfillmentEvent;
use uuid::Uuid;

pub use herald_test::faults::Timeline;

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
            // Not about authentication (a member's env may still set it).
            .env("ORDERS_AUTH", "none")
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

/// The SKUs the fault scenarios' orders draw from: few enough that orders
/// compete for them, so the fulfillment stock runs out mid-run.
const SKUS: u64 = 8;
/// The fleet's `--initial-stock` (the service's default).
pub const INITIAL_STOCK: i64 = 1_000;

/// Places an order under `key` until the API accepts it (201): a retry
/// under the same Idempotency-Key never makes a second order. Its lines
/// (1–3 of the [`SKUS`], 1–3 units each) follow from the key, so a retry
/// sends the same order.
pub async fn place(client: &reqwest::Client, base: &str, key: &str) -> Uuid {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    let mut bits = hasher.finish();
    let mut take = |n: u64| {
        let value = bits % n;
        bits /= n;
        value
    };
    let lines = 1 + take(3);
    let first = take(SKUS);
    let items: Vec<serde_json::Value> = (0..lines)
        .map(|line| {
            serde_json::json!({
                "sku": format!("SKU-{}", (first + line) % SKUS),
                "quantity": 1 + take(3),
                "unit_price": "2.50",
            })
        })
        .collect();
    let order = serde_json::json!({
        "customer_id": Uuid::new_v4(),
        "currency": "EUR",
        "items": items,
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

/// Cancels `order` until the API has done it. A 409 means an earlier
/// attempt did, and only its answer was lost (nothing else cancels it).
pub async fn cancel(client: &reqwest::Client, base: &str, order: Uuid) {
    until_answered(&format!("POST /orders/{order}/cancel"), &[200, 409], || {
        client
            .post(format!("{base}/orders/{order}/cancel"))
            .json(&serde_json::json!({ "reason": "changed my mind" }))
    })
    .await;
}

/// Places an order under `key` until it is accepted (counted in
/// `accepted`) and, when `cancel`, cancels it: one task of a scenario's
/// load. Returns the order and whether it was cancelled.
pub async fn place_then_cancel(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    cancel: bool,
    accepted: &std::sync::atomic::AtomicUsize,
) -> (Uuid, bool) {
    let id = place(client, base, key).await;
    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    if cancel {
        self::cancel(client, base, id).await;
    }
    (id, cancel)
}

/// Waits for a load's tasks: the orders they placed, and those of them
/// they cancelled.
pub async fn placed(
    mut posts: tokio::task::JoinSet<(Uuid, bool)>,
) -> (BTreeSet<Uuid>, BTreeSet<Uuid>) {
    let (mut ids, mut cancelled) = (BTreeSet::new(), BTreeSet::new());
    while let Some(done) = posts.join_next().await {
        let (id, was_cancelled) = done.expect("load task");
        ids.insert(id);
        if was_cancelled {
            cancelled.insert(id);
        }
    }
    (ids, cancelled)
}

/// One `orders run` process (API, relay, consumers, processor) on
/// `brokers` and `database_url`, with topics and groups of its own, started
/// and ready: the fleet of the single-process scenarios.
pub struct OrdersRun {
    /// The process, as the only member of its fleet.
    pub fleet: Fleet,
    /// The API's base URL, and a client for it.
    pub base: String,
    pub client: reqwest::Client,
    /// Its fulfillment topic (the order-events topic is `<this>` without
    /// the `-fulfillment` suffix).
    pub fulfillment_topic: String,
    /// Where the process logs (removed by [`OrdersRun::clean_up`]).
    pub log_dir: std::path::PathBuf,
    /// Its `ORDERS_GROUP_PREFIX`: the fulfillment processor's consumer
    /// group is `<this>-fulfillment`.
    pub group_prefix: String,
}

impl OrdersRun {
    /// Starts `orders run` (its topics with `partitions` partitions;
    /// `name` names its log folder and groups) and waits until it is ready.
    pub async fn start(brokers: &str, database_url: &str, name: &str, partitions: i32) -> Self {
        let topic = herald_test::unique_name("order-events");
        let fulfillment_topic = format!("{topic}-fulfillment");
        let log_dir =
            std::env::temp_dir().join(herald_test::unique_name(&format!("orders-{name}")));
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let group_prefix = herald_test::unique_name(name);
        let env: Vec<(String, String)> = [
            ("KAFKA_BROKERS", brokers.to_owned()),
            ("DATABASE_URL", database_url.to_owned()),
            ("ORDERS_EVENTS_TOPIC", topic.clone()),
            ("ORDERS_FULFILLMENT_TOPIC", fulfillment_topic.clone()),
            ("ORDERS_GROUP_PREFIX", group_prefix.clone()),
            ("ORDERS_TOPIC_PARTITIONS", partitions.to_string()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let http = format!("127.0.0.1:{}", herald_test::free_port());
        let mut fleet = Fleet(vec![Member::new(
            "run",
            &["run", "--http-addr", &http, "--metrics-addr", "127.0.0.1:0"],
            &env,
            &[],
            &log_dir,
        )]);
        fleet.0[0].start();
        let base = format!("http://{http}");
        let client = reqwest::Client::new();
        wait_ready(&client, &base).await;
        OrdersRun {
            fleet,
            base,
            client,
            fulfillment_topic,
            log_dir,
            group_prefix,
        }
    }

    /// The `orders run` process.
    pub fn process(&mut self) -> &mut Member {
        &mut self.fleet.0[0]
    }

    /// Stops the process (it must stop cleanly).
    pub fn stop(&mut self) {
        let unclean = self.fleet.stop();
        assert!(
            unclean.is_empty(),
            "orders run did not stop cleanly: {unclean:?}"
        );
    }
}

impl Drop for OrdersRun {
    /// Removes the process's logs, unless the test failed: then they are
    /// kept (the judgement runs after the stop) and their folder is named.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("orders run's log kept in {}", self.log_dir.display());
        } else {
            std::fs::remove_dir_all(&self.log_dir).ok();
        }
    }
}

/// A paced load in the background: `orders` orders posted at `rate` per
/// second (at most 16 in flight), every `cancel_every`-th cancelled once
/// accepted, each under the Idempotency-Key `<prefix>-<i>`, while the test
/// injects its faults in the foreground.
pub struct PacedLoad {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<(BTreeSet<Uuid>, BTreeSet<Uuid>)>,
}

impl PacedLoad {
    /// Starts posting to the API at `base`.
    pub fn start(
        client: &reqwest::Client,
        base: &str,
        orders: usize,
        rate: u64,
        cancel_every: usize,
        prefix: &str,
    ) -> PacedLoad {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        Self::start_until(client, base, orders, rate, cancel_every, prefix, done)
    }

    /// As [`PacedLoad::start`], posting on past `orders` until `done` is set.
    pub fn start_until(
        client: &reqwest::Client,
        base: &str,
        orders: usize,
        rate: u64,
        cancel_every: usize,
        prefix: &str,
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> PacedLoad {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (client, base, prefix) = (client.clone(), base.to_owned(), prefix.to_owned());
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let limit = Arc::new(tokio::sync::Semaphore::new(16));
            let mut posts = tokio::task::JoinSet::new();
            let start = tokio::time::Instant::now();
            let mut i = 0;
            while i < orders || !done.load(Ordering::SeqCst) {
                tokio::time::sleep_until(start + Duration::from_millis(i as u64 * 1000 / rate))
                    .await;
                let permit = Arc::clone(&limit).acquire_owned().await.expect("permit");
                let (client, base, counter) = (client.clone(), base.clone(), Arc::clone(&counter));
                let key = format!("{prefix}-{i}");
                posts.spawn(async move {
                    let placed =
                        place_then_cancel(&client, &base, &key, i % cancel_every == 0, &counter)
                            .await;
                    drop(permit);
                    placed
                });
                i += 1;
            }
            placed(posts).await
        });
        PacedLoad { accepted, task }
    }

    /// How many orders the API has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The count behind [`PacedLoad::accepted`], for a chaos thread.
    pub fn counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        std::sync::Arc::clone(&self.accepted)
    }

    /// Waits until `count` orders are accepted.
    pub async fn wait_accepted(&self, count: usize) {
        herald_test::wait_until(
            &format!("{count} orders accepted"),
            Duration::from_secs(300),
            || self.accepted() >= count,
        )
        .await;
    }

    /// Waits for the whole load: every order placed (and those cancelled).
    pub async fn finish(self) -> (BTreeSet<Uuid>, BTreeSet<Uuid>) {
        self.task.await.expect("the load")
    }
}

/// Waits out a fault of `length`, checking all along that `run` is up.
pub async fn lasting(length: Duration, run: &mut Member) {
    let start = Instant::now();
    herald_test::wait_until("the fault's length", length * 2, || {
        assert_eq!(run.exited(), None, "{} exited during a fault", run.name);
        start.elapsed() >= length
    })
    .await;
}

/// A process's `/readyz` body (it answers 503 while not ready).
pub async fn readiness(client: &reqwest::Client, base: &str) -> Result<serde_json::Value, String> {
    let response = client
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    response.json().await.map_err(|e| e.to_string())
}

/// How many times larger a soak run is than the CI-sized one: the
/// `HERALD_SOAK` factor (1 when unset). Scenarios multiply their event
/// counts and outage lengths by it.
pub fn soak() -> usize {
    std::env::var("HERALD_SOAK")
        .ok()
        .and_then(|factor| factor.parse().ok())
        .filter(|factor| *factor >= 1)
        .unwrap_or(1)
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

/// One scenario at a time: each loads the machine's two cores with a
/// fleet of processes (and most with servers of their own), and two side
/// by side would judge the machine rather than the service.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// What a load run had accepted, to judge the pipeline by once it is done.
pub struct Accepted {
    /// Every order the API accepted.
    pub ids: BTreeSet<Uuid>,
    /// Those of them that were cancelled once accepted.
    pub cancelled: BTreeSet<Uuid>,
    /// The brokers and the fulfillment topic (with its partitions).
    pub brokers: String,
    pub fulfillment_topic: String,
    pub partitions: i32,
}

impl Accepted {
    /// Every fulfillment event on the fulfillment topic, read
    /// `read_committed` to the end.
    pub fn outcomes(&self) -> Vec<FulfillmentEvent> {
        herald_test::Kafka::at(&self.brokers)
            .read_to_end(&self.fulfillment_topic, self.partitions, "read_committed")
            .iter()
            .map(|message| {
                let envelope = herald_kafka::envelope_of(message).expect("envelope");
                envelope.decode().expect("fulfillment event")
            })
            .collect()
    }

    /// Waits until the fleet has worked off everything: a view, the
    /// notifications and an outcome per order, and an empty outbox. When it
    /// does not within five minutes, panics with what it saw last and the
    /// order-events topic judged against the outbox, which tells a relay
    /// that lost or withheld events from consumers that did not apply them.
    pub async fn wait_caught_up(&self, pool: &sqlx::PgPool) {
        let limit = Duration::from_secs(300);
        let start = Instant::now();
        loop {
            let seen = match self.caught_up(pool).await {
                Ok(()) => return,
                Err(seen) => seen,
            };
            if start.elapsed() >= limit {
                let events = self.events_report(pool).await;
                panic!(
                    "the pipeline did not catch up within {limit:?}; last seen: {seen}\n\
                     order events on the topic, judged against the outbox:\n{events}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `Ok` once every accepted order has its view, notifications and
    /// outcome and the outbox is empty; else what is there.
    async fn caught_up(&self, pool: &sqlx::PgPool) -> Result<(), String> {
        let expected = self.ids.len() as i64;
        let events_expected = expected + self.cancelled.len() as i64;
        let (views, notified, pending): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM order_views), \
                    (SELECT count(*) FROM notifications), \
                    (SELECT count(*) FROM herald_outbox_pending)",
        )
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
        let cancelled_views: i64 =
            sqlx::query_scalar("SELECT count(*) FROM order_views WHERE status = 'cancelled'")
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
        // The releases the outcomes imply are applied to the stock after
        // the outcomes: caught up once the stock accounts for them too.
        let (outcomes, stock) = tokio::task::block_in_place(|| {
            let events = self.outcomes();
            let outcomes = outcomes_per_order(&events).len() as i64;
            (outcomes, self.stock_problems(&events))
        });
        if views >= expected
            && cancelled_views >= self.cancelled.len() as i64
            && notified >= events_expected
            && pending == 0
            && outcomes >= expected
            && stock.is_empty()
        {
            Ok(())
        } else {
            Err(format!(
                "views {views}, notified orders {notified}, outbox pending {pending}, \
                 orders with an outcome {outcomes}, stock off for {stock:?}"
            ))
        }
    }

    /// The order-events topic (read `read_committed`, with its dead
    /// letters) judged against every event of the outbox, in id order.
    pub async fn events_report(&self, pool: &sqlx::PgPool) -> herald_test::invariants::Report {
        let committed: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT event_id, aggregate_id FROM herald_outbox ORDER BY id")
                .fetch_all(pool)
                .await
                .expect("the outbox");
        let topic = self
            .fulfillment_topic
            .trim_end_matches("-fulfillment")
            .to_owned();
        let kafka = herald_test::Kafka::at(&self.brokers);
        tokio::task::block_in_place(|| {
            herald_test::invariants::Check::new()
                .committed(committed)
                .read(
                    &kafka,
                    &topic,
                    self.partitions,
                    Some(&format!("{topic}.dlq")),
                )
        })
    }

    /// Judges what is durable, with nothing running: each accepted order
    /// exists once; on `read_committed` it has exactly one fulfillment
    /// outcome (and at most one release, after a reservation, when it was
    /// cancelled); one notification per event; the read model holds its
    /// final state; the outbox is empty. Returns how many cancelled orders
    /// kept their reservation (allowed: see the comment below). `report`
    /// goes with every failure.
    pub async fn assert_effectively_once(&self, pool: &sqlx::PgPool, report: &str) {
        let orders: BTreeSet<Uuid> = sqlx::query_scalar("SELECT id FROM orders")
            .fetch_all(pool)
            .await
            .expect("orders")
            .into_iter()
            .collect();
        assert_eq!(
            orders, self.ids,
            "the orders table holds exactly the accepted orders\n{report}"
        );

        let events = self.outcomes();
        let outcomes = outcomes_per_order(&events);
        // Read per partition in offset order, so per order in its key's
        // order: exactly one outcome first, then at most one release: of a
        // reservation when the order was cancelled (always: the topology's
        // state follows its partitions), or of the SKUs set aside for a
        // rejected order.
        let wrong: Vec<_> = outcomes
            .iter()
            .filter(|(order, kinds)| {
                let allowed: &[&[&str]] = if self.cancelled.contains(order) {
                    &[
                        &["reserved", "released"],
                        &["rejected"],
                        &["rejected", "released"],
                    ]
                } else {
                    &[&["reserved"], &["rejected"], &["rejected", "released"]]
                };
                !allowed.contains(&kinds.as_slice())
            })
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "orders whose fulfillment is not one outcome (and a release where one is due), in order: {wrong:?}\n{report}"
        );
        assert_eq!(
            outcomes.keys().copied().collect::<BTreeSet<_>>(),
            self.ids,
            "an outcome for each accepted order and no other\n{report}"
        );
        let stock = self.stock_problems(&events);
        assert!(
            stock.is_empty(),
            "the stock per SKU is not the initial stock minus what reserved, uncancelled orders hold: {stock:?}\n{report}"
        );

        let notifications: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT order_id, count(*) FROM notifications GROUP BY order_id")
                .fetch_all(pool)
                .await
                .expect("notifications");
        let wrong: Vec<_> = notifications
            .iter()
            .filter(|(order, n)| *n != if self.cancelled.contains(order) { 2 } else { 1 })
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "orders not notified once per event: {wrong:?}\n{report}"
        );
        assert_eq!(
            notifications
                .iter()
                .map(|(o, _)| *o)
                .collect::<BTreeSet<_>>(),
            self.ids,
            "a notification for each accepted order\n{report}"
        );

        let views: Vec<(Uuid, String, i32)> =
            sqlx::query_as("SELECT order_id, status, version FROM order_views")
                .fetch_all(pool)
                .await
                .expect("views");
        assert_eq!(views.len(), self.ids.len(), "one view per order\n{report}");
        for (order, status, version) in &views {
            assert!(
                self.ids.contains(order),
                "a view of an unknown order {order}"
            );
            let final_state = if self.cancelled.contains(order) {
                ("cancelled", 2)
            } else {
                ("created", 1)
            };
            assert_eq!(
                (status.as_str(), *version),
                final_state,
                "view of {order}\n{report}"
            );
        }
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_outbox_pending")
            .fetch_one(pool)
            .await
            .expect("pending");
        assert_eq!(pending, 0, "the outbox is drained\n{report}");
        // The run's figures for a soak's or a closing note's table (shown
        // with --nocapture; every count below was asserted above).
        let rejected = outcomes.values().filter(|k| k[0] == "rejected").count();
        eprintln!(
            "judged: {} orders ({rejected} rejected, {} cancelled), {} order events, \
             {} fulfillment records read_committed; lost 0, duplicated 0, misordered 0; \
             stock per SKU accounted for",
            self.ids.len(),
            self.cancelled.len(),
            self.ids.len() + self.cancelled.len(),
            events.len(),
        );
    }

    /// The SKUs whose stock, as the fulfillment topology's SKU changelog
    /// holds it (`read_committed`, last value per SKU), is not
    /// [`INITIAL_STOCK`] minus the units of the orders that are reserved and
    /// not released, with both figures.
    pub fn stock_problems(&self, events: &[FulfillmentEvent]) -> Vec<String> {
        // Per order in its key's order: a release ends what a reservation
        // held (a rejected order's release ends nothing public).
        let mut held = BTreeMap::new();
        for event in events {
            match event {
                FulfillmentEvent::InventoryReserved(e) => {
                    held.insert(e.order_id, &e.items);
                }
                FulfillmentEvent::InventoryReleased(e) => {
                    held.remove(&e.order_id);
                }
                FulfillmentEvent::OrderRejected(_) => {}
            }
        }
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        for item in held.values().flat_map(|items| items.iter()) {
            *expected.entry(item.sku.clone()).or_insert(INITIAL_STOCK) -= i64::from(item.quantity);
        }
        let topic = orders::fulfillment::Topics::of(&self.fulfillment_topic).sku_stock;
        let mut found: BTreeMap<String, i64> = BTreeMap::new();
        for message in herald_test::Kafka::at(&self.brokers).read_to_end(
            &topic,
            self.partitions,
            "read_committed",
        ) {
            use rdkafka::Message as _;
            let sku = String::from_utf8_lossy(message.key().expect("a SKU")).into_owned();
            let units: i64 =
                serde_json::from_slice(message.payload().expect("units")).expect("units as JSON");
            found.insert(sku, units);
        }
        let skus: BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
        skus.into_iter()
            .filter_map(|sku| {
                let want = expected.get(sku).copied().unwrap_or(INITIAL_STOCK);
                let have = found.get(sku).copied().unwrap_or(INITIAL_STOCK);
                (want != have).then(|| format!("{sku}: {have} in stock, {want} expected"))
            })
            .collect()
    }
}

/// The kinds of fulfillment records per order, in the order read.
fn outcomes_per_order(events: &[FulfillmentEvent]) -> BTreeMap<Uuid, Vec<&'static str>> {
    let mut outcomes: BTreeMap<Uuid, Vec<&'static str>> = BTreeMap::new();
    for event in events {
        let (kind, order) = match event {
            FulfillmentEvent::InventoryReserved(e) => ("reserved", e.order_id),
            FulfillmentEvent::OrderRejected(e) => ("rejected", e.order_id),
            FulfillmentEvent::InventoryReleased(e) => ("released", e.order_id),
        };
        outcomes.entry(order).or_default().push(kind);
    }
    outcomes
}
