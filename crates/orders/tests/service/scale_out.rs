//! Scale-out: 2 API processes, 2 relays and 3 workers as separate processes
//! on one Kafka and one PostgreSQL; `orders load` of 20k orders ends with
//! every order in the read model exactly once.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use orders::cli::LoadArgs;

use crate::support::*;

const ORDERS: usize = 20_000;

/// The API processes' HS256 secret (a test's: at least 32 bytes).
const SECRET: &str = "scale-out-test-secret-of-32-bytes-or-more";

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        herald_test::stop_gracefully(&mut self.0, Duration::from_secs(30));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_scale_out_and_lose_nothing() {
    let Some(kafka) = herald_test::kafka() else {
        return;
    };
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let topic = herald_test::unique_name("order-events");
    let group_prefix = herald_test::unique_name("scale");
    let log_dir = std::env::temp_dir().join(herald_test::unique_name("orders-scale-out"));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let command = |args: &[&str], name: &str| {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).expect("log");
        let mut c = Command::new(env!("CARGO_BIN_EXE_orders"));
        c.args(args)
            .env("KAFKA_BROKERS", kafka.brokers())
            .env("DATABASE_URL", db.url())
            .env("ORDERS_EVENTS_TOPIC", &topic)
            .env("ORDERS_GROUP_PREFIX", &group_prefix)
            .env("ORDERS_TOPIC_PARTITIONS", "6")
            .env("ORDERS_DB_POOL", "8")
            .env("RUST_LOG", "warn")
            // Authentication on, as in production: the load mints its
            // customers' tokens with the same secret.
            .env("ORDERS_AUTH", "jwt")
            .env("ORDERS_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        c
    };
    let status = command(&["migrate"], "migrate").status().expect("migrate");
    assert!(status.success());

    let mut processes = Processes(Vec::new());
    let api_ports = [herald_test::free_port(), herald_test::free_port()];
    for (i, port) in api_ports.iter().enumerate() {
        let addr = format!("127.0.0.1:{port}");
        processes.0.push(
            command(&["api", "--http-addr", &addr], &format!("api-{i}"))
                .spawn()
                .expect("api"),
        );
    }
    for i in 0..2 {
        processes.0.push(
            command(
                &["relay", "--metrics-addr", "127.0.0.1:0"],
                &format!("relay-{i}"),
            )
            .spawn()
            .expect("relay"),
        );
    }
    for i in 0..3 {
        processes.0.push(
            command(
                &["worker", "--metrics-addr", "127.0.0.1:0"],
                &format!("worker-{i}"),
            )
            .spawn()
            .expect("worker"),
        );
    }
    let client = reqwest::Client::new();
    for port in api_ports {
        eventually(
            &client,
            &format!("http://127.0.0.1:{port}/readyz"),
            "API ready",
            |b| b["status"] == "ready",
        )
        .await;
    }

    // Half the load through each API process.
    let mut loads = Vec::new();
    for port in api_ports {
        let args = LoadArgs {
            orders: ORDERS / 2,
            rate: 0,
            concurrency: 16,
            api: None,
            timeout_secs: 600,
            jwt_private_key: None,
        };
        let signer = orders::api::auth::TokenSigner::hs256(SECRET.as_bytes()).expect("signer");
        loads.push(tokio::spawn(async move {
            orders::load::run(&format!("http://127.0.0.1:{port}"), &args, Some(&signer)).await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for load in loads {
        let report = load.await.expect("task").expect("load");
        eprintln!("{report}");
        ids.extend(report.order_ids);
    }
    assert_eq!(ids.len(), ORDERS);

    let pool = db.pool().await;
    let (views, distinct, created): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT order_id), count(*) FILTER (WHERE status = 'created' AND version = 1) FROM order_views",
    )
    .fetch_one(&pool)
    .await
    .expect("views");
    assert_eq!(
        (views, distinct, created),
        (ORDERS as i64, ORDERS as i64, ORDERS as i64),
        "every order once, in its final state"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let notified: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&pool)
            .await
            .expect("count");
        if notified == ORDERS as i64 {
            break;
        }
        assert!(
            notified < ORDERS as i64,
            "duplicate notifications: {notified}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "notifications: {notified}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(processes);
    pool.close().await;
    std::fs::remove_dir_all(&log_dir).ok();
}
