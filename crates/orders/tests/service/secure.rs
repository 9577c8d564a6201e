//! The pipeline on the secured services of `scripts/services.sh up
//! --secure` (issue #17): Kafka over SASL_SSL with SCRAM, PostgreSQL over
//! TLS with the server's certificate verified (`sslmode=verify-full`). And
//! the start-up errors of a wrong password, an unknown CA and a plaintext
//! client at the TLS listener: each names the setting to fix and never
//! prints the secret.

use std::time::Duration;

use orders::app::{Application, Components, Config, Database};
use orders::fulfillment::FulfillmentEvent;
use rdkafka::consumer::{Consumer as _, StreamConsumer};

use crate::support::*;

/// A CA bundle that did not sign the test servers' certificates.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `config` pointed at the secured services, for `db`.
fn secured(config: &mut Config, secure: &herald_test::Secure, db: &herald_test::TestDatabase) {
    config.brokers = secure.brokers.clone();
    config.kafka_settings = secure.kafka_settings();
    config.database = Database::Postgres(Box::new(secure.database_options(db)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_sasl_ssl_and_verified_tls() {
    let Some(secure) = herald_test::secure() else {
        return;
    };
    let Some(p) =
        pipeline_configured(Components::ALL, |config, db| secured(config, &secure, db)).await
    else {
        return;
    };
    // The service's own pool: TLS, as the TLS-only role.
    let (ssl, user): (bool, String) = sqlx::query_as(
        "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&p.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(ssl, "the service's database connection uses TLS");
    assert_eq!(user, "herald_tls");

    let client = reqwest::Client::new();
    let id = p.create_order(&client, &valid_order()).await;
    // Relay → Kafka (SASL_SSL) → projection → read model.
    let order = eventually(
        &client,
        &format!("{}/orders/{id}", p.base),
        "the order in the read model",
        |b| b["status"] == "created",
    )
    .await;
    assert_eq!(order["version"], 1);
    // → notifications consumer.
    herald_test::poll_until(
        "the order's notification",
        Duration::from_secs(60),
        async || {
            let kinds: Vec<String> =
                sqlx::query_scalar("SELECT kind FROM notifications WHERE order_id = $1::uuid")
                    .bind(&id)
                    .fetch_all(&p.pool)
                    .await
                    .map_err(|e| e.to_string())?;
            if kinds.len() == 1 {
                Ok(())
            } else {
                Err(format!("{kinds:?}"))
            }
        },
    )
    .await;
    // → the exactly-once processor's output, read back over SASL_SSL too.
    let mut reader =
        secure
            .kafka_settings()
            .into_iter()
            .fold(p.kafka.config(), |mut config, (key, value)| {
                config.set(key, value);
                config
            });
    let reader: StreamConsumer = reader
        .set("bootstrap.servers", &secure.brokers)
        .set("group.id", herald_test::unique_name("secure-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    reader
        .subscribe(&[&p.config.fulfillment_topic])
        .expect("subscribe");
    let outcome = loop {
        let message = tokio::time::timeout(Duration::from_secs(60), reader.recv())
            .await
            .expect("a fulfillment event within 60 s");
        // A topic created a moment ago may not be in the reader's metadata yet.
        let Ok(message) = message else { continue };
        let event: FulfillmentEvent = herald_kafka::envelope_of(&message)
            .expect("envelope")
            .decode()
            .expect("fulfillment event");
        break event;
    };
    match outcome {
        FulfillmentEvent::InventoryReserved(e) => assert_eq!(e.order_id.to_string(), id),
        other => panic!("expected the order's reservation, got {other:?}"),
    }
    p.stop().await;
}

/// The start-up error of a relay process on `configure`d secured settings,
/// as the log would show it, and the services' secrets that it must not show.
async fn start_up_error(
    configure: impl FnOnce(&mut Config, &herald_test::Secure),
) -> Option<(String, [String; 2])> {
    let secure = herald_test::secure()?;
    let postgres = herald_test::postgres()?;
    let db = postgres.database().await;
    let mut config = config_at(&secure.brokers, &db);
    secured(&mut config, &secure, &db);
    configure(&mut config, &secure);
    let relay = Components {
        relay: true,
        ..Components::NONE
    };
    let started = tokio::time::timeout(Duration::from_secs(60), Application::build(config, relay))
        .await
        .expect("start-up ends within 60 s");
    let error = started.err().expect("the start-up fails");
    let secrets = [
        secure.sasl_password.clone(),
        secure.database_password().to_owned(),
    ];
    Some((format!("{error:#}"), secrets))
}

/// Asserts that `text` shows none of `secrets`.
fn assert_hides(text: &str, secrets: &[impl AsRef<str>]) {
    for secret in secrets {
        let secret = secret.as_ref();
        assert!(!secret.is_empty(), "an empty secret proves nothing");
        assert!(!text.contains(secret), "a secret is printed:\n{text}");
    }
}

fn set(config: &mut Config, key: &str, value: &str) {
    config.kafka_settings.retain(|(k, _)| k != key);
    config
        .kafka_settings
        .push((key.to_owned(), value.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_names_the_setting_and_hides_the_secret() {
    let wrong = "not-the-password-5e2d";
    let Some((error, secrets)) =
        start_up_error(|config, _| set(config, "sasl.password", wrong)).await
    else {
        return;
    };
    assert!(error.contains("sasl.password"), "{error}");
    assert!(error.contains("SASL"), "{error}");
    assert_hides(&error, &[wrong]);
    assert_hides(&error, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kafka_ca_names_ssl_ca_location() {
    let Some((error, secrets)) =
        start_up_error(|config, _| set(config, "ssl.ca.location", SYSTEM_CA_BUNDLE)).await
    else {
        return;
    };
    assert!(error.contains("ssl.ca.location"), "{error}");
    assert_hides(&error, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_at_the_tls_listener_names_security_protocol() {
    let Some((error, secrets)) = start_up_error(|config, _| config.kafka_settings.clear()).await
    else {
        return;
    };
    assert!(error.contains("security.protocol"), "{error}");
    assert_hides(&error, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_postgres_ca_names_sslrootcert_and_hides_the_password() {
    let Some((error, secrets)) = start_up_error(|config, _| {
        let Database::Postgres(options) = &mut config.database else {
            unreachable!("a PostgreSQL configuration");
        };
        **options = (**options).clone().ssl_root_cert(SYSTEM_CA_BUNDLE);
    })
    .await
    else {
        return;
    };
    assert!(error.contains("DATABASE_URL"), "{error}");
    assert!(error.contains("sslrootcert"), "{error}");
    assert_hides(&error, &secrets);
}

/// A JWT secret for the subcommands below (at least 32 bytes).
const JWT_SECRET: &str = "jwt-secret-that-no-log-line-may-show-0123";

/// `orders <args>` on the secured services, every secret in its settings,
/// logging at debug level in `format`; its output goes to `log`.
fn orders_command(
    secure: &herald_test::Secure,
    db: &herald_test::TestDatabase,
    format: &str,
    http_port: u16,
    topic: &str,
    args: &[&str],
    log: &std::path::Path,
) -> std::process::Command {
    let settings: Vec<String> = secure
        .kafka_settings()
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let output = std::fs::File::create(log).expect("log file");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_orders"));
    command
        .args(args)
        .env("KAFKA_BROKERS", &secure.brokers)
        .env("KAFKA_SETTINGS", settings.join(","))
        .env("DATABASE_URL", secure.database_url_of(db))
        .env("ORDERS_AUTH", "jwt")
        .env("ORDERS_JWT_SECRET", JWT_SECRET)
        .env("HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("ORDERS_EVENTS_TOPIC", topic)
        .env("ORDERS_FULFILLMENT_TOPIC", format!("{topic}-fulfillment"))
        .env("ORDERS_GROUP_PREFIX", topic)
        .env("LOG_FORMAT", format)
        .env("RUST_LOG", "debug")
        .stdout(output.try_clone().expect("log file"))
        .stderr(output);
    command
}

/// Every subcommand, started with secret-bearing settings (the SASL
/// password, the database password, the JWT secret) at debug level, in the
/// text and the JSON log format: no line of its output shows a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subcommand_logs_a_secret() {
    let (Some(secure), Some(postgres)) = (herald_test::secure(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let secrets = [
        secure.sasl_password.as_str(),
        secure.database_password(),
        JWT_SECRET,
    ];
    let dir = std::env::temp_dir().join(herald_test::unique_name("secrets"));
    std::fs::create_dir_all(&dir).expect("log dir");
    let checked = |log: &std::path::Path, what: &str| {
        let text = std::fs::read_to_string(log).expect("log");
        assert!(!text.is_empty(), "`orders {what}` logged nothing");
        assert_hides(&text, &secrets);
        text
    };
    let customer = uuid::Uuid::new_v4().to_string();
    let topic = herald_test::unique_name("secrets");
    for format in ["text", "json"] {
        // The services, each until it is listening; `load` against `run`.
        for subcommand in ["api", "relay", "processor", "worker", "run"] {
            let what = format!("{subcommand} ({format})");
            let log = dir.join(format!("{subcommand}-{format}.log"));
            let port = herald_test::free_port();
            let mut child = orders_command(&secure, &db, format, port, &topic, &[subcommand], &log)
                .spawn()
                .expect("orders");
            herald_test::poll_until(
                &format!("`orders {what}` listening"),
                Duration::from_secs(60),
                async || {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("`orders {what}` exited ({status}):\n{text}");
                    }
                    if text.contains("listening") {
                        Ok(())
                    } else {
                        Err(text)
                    }
                },
            )
            .await;
            if subcommand == "run" {
                let load_log = dir.join(format!("load-{format}.log"));
                let api = format!("http://127.0.0.1:{port}");
                let status = orders_command(
                    &secure,
                    &db,
                    format,
                    0,
                    &topic,
                    &["load", "--orders", "3", "--concurrency", "1", "--api", &api],
                    &load_log,
                )
                .status()
                .expect("orders load");
                let text = checked(&load_log, &format!("load ({format})"));
                assert!(status.success(), "`orders load` failed:\n{text}");
            }
            let stopped = herald_test::stop_gracefully(
                std::slice::from_mut(&mut child),
                Duration::from_secs(30),
            );
            checked(&log, &what);
            assert!(
                stopped[0].is_some_and(|s| s.success()),
                "`orders {what}` did not stop cleanly: {stopped:?}"
            );
        }
        // The commands that run to their end.
        for args in [
            &["migrate"][..],
            &["outbox", "status"],
            &["dlq", "list"],
            &["token", "--customer", &customer],
        ] {
            let what = format!("{} ({format})", args.join(" "));
            let log = dir.join(format!("{}-{format}.log", args.join("-")));
            let status = orders_command(&secure, &db, format, 0, &topic, args, &log)
                .status()
                .expect("orders");
            let text = checked(&log, &what);
            assert!(status.success(), "`orders {what}` failed:\n{text}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
