//! The whole pipeline against real Kafka and PostgreSQL: orders go through
//! the API, the outbox, the relay and Kafka into the read model and the
//! notification log; a poison event parks its order behind its dead letter
//! and a replay applies the order's events in their order once the cause is
//! fixed.

use std::time::Duration;

use herald_kafka::{Publisher, PublisherConfig};
use orders::domain::{OrderCreated, OrderEvent, OrderShipped};
use serde_json::json;
use uuid::Uuid;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_to_the_read_model_and_notifications() {
    let Some(p) = pipeline().await else { return };
    let client = reqwest::Client::new();
    let customer = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut order = valid_order();
        order["customer_id"] = json!(customer);
        ids.push(p.create_order(&client, &order).await);
    }
    let ship = client
        .post(format!("{}/orders/{}/ship", p.base, ids[0]))
        .send()
        .await
        .expect("ship");
    assert_eq!(ship.status(), 200);
    let cancel = client
        .post(format!("{}/orders/{}/cancel", p.base, ids[1]))
        .json(&json!({"reason": "found it cheaper"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 200);

    let shipped = eventually(
        &client,
        &format!("{}/orders/{}", p.base, ids[0]),
        "shipped in the read model",
        |b| b["status"] == "shipped",
    )
    .await;
    assert_eq!(shipped["version"], 2);
    assert_eq!(shipped["last_event_type"], "OrderShipped");
    let cancelled = eventually(
        &client,
        &format!("{}/orders/{}", p.base, ids[1]),
        "cancelled in the read model",
        |b| b["status"] == "cancelled",
    )
    .await;
    assert_eq!(cancelled["cancel_reason"], "found it cheaper");
    let listed = eventually(
        &client,
        &format!("{}/orders?customer_id={customer}", p.base),
        "three orders listed",
        |b| b["orders"].as_array().is_some_and(|o| o.len() == 3),
    )
    .await;
    let statuses: Vec<&str> = listed["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["status"].as_str().expect("status"))
        .collect();
    assert!(statuses.contains(&"created"));

    // One notification per event, exactly once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM notifications ORDER BY id")
            .fetch_all(&p.pool)
            .await
            .expect("notifications");
        if kinds.len() >= 5 {
            assert_eq!(kinds.len(), 5, "{kinds:?}");
            assert_eq!(kinds.iter().filter(|k| *k == "order_created").count(), 3);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "notifications: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client
        .get(format!("{}/metrics", p.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("herald_relay_published_total 5"),
        "{metrics}"
    );
    p.stop().await;
}

/// The parked keys of `group` (read from the parked-key table).
async fn parked_keys(p: &Pipeline, group: &str) -> Vec<herald_kafka::parking::ParkedKey> {
    let (config, group) = (p.kafka.config(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        herald_kafka::parking::read_parked(
            &config,
            herald_kafka::parking::DEFAULT_PARKED_TOPIC,
            Some(&group),
            Duration::from_secs(30),
        )
    })
    .await
    .expect("task")
    .expect("parked keys")
}

fn created(order_id: Uuid, currency: &str) -> OrderEvent {
    OrderEvent::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        order_id,
        customer_id: Uuid::new_v4(),
        items: vec![orders::domain::OrderItem {
            sku: "A".into(),
            quantity: 1,
            unit_price: "5.00".parse().expect("decimal"),
        }],
        total: "5.00".parse().expect("decimal"),
        currency: currency.into(),
        version: 1,
        timestamp: chrono::Utc::now(),
    })
}

/// An order whose `OrderCreated` the read model refuses (a stand-in for any
/// defect the projection cannot get past), its `OrderShipped` behind it, and
/// another order's `OrderCreated`; returns once the other order is visible
/// and the poisoned one is parked with both its events.
struct Poisoned {
    order_id: Uuid,
    poison: OrderEvent,
    shipped: OrderEvent,
    parked: herald_kafka::parking::ParkedKey,
}

async fn poison_an_order(
    p: &Pipeline,
    publisher: &Publisher,
    client: &reqwest::Client,
) -> Poisoned {
    let projection = p.config.group("projection");
    sqlx::query("ALTER TABLE order_views ADD CONSTRAINT poison CHECK (currency <> 'XTS')")
        .execute(&p.pool)
        .await
        .expect("constraint");
    let order_id = Uuid::now_v7();
    let poison = created(order_id, "XTS");
    let shipped = OrderEvent::OrderShipped(OrderShipped {
        event_id: Uuid::new_v4(),
        order_id,
        version: 2,
        timestamp: chrono::Utc::now(),
    });
    let other = Uuid::now_v7();
    for event in [&poison, &shipped, &created(other, "EUR")] {
        publisher
            .publish(&p.config.topics.events, event)
            .await
            .expect("published");
    }
    // Other orders flow past the parked one.
    eventually(
        client,
        &format!("{}/orders/{other}", p.base),
        "the other order",
        |b| b["status"] == "created",
    )
    .await;
    let parked = herald_test::poll_until(
        "the order parked with both its events",
        Duration::from_secs(60),
        async || {
            let keys = parked_keys(p, &projection).await;
            match keys.iter().find(|k| k.key == order_id.to_string()) {
                Some(key) if key.offsets.len() == 2 => Ok(key.clone()),
                found => Err(format!("{found:?}")),
            }
        },
    )
    .await;
    Poisoned {
        order_id,
        poison,
        shipped,
        parked,
    }
}

/// The read model's HTTP status for `order_id`.
async fn order_status(
    p: &Pipeline,
    client: &reqwest::Client,
    order_id: Uuid,
) -> reqwest::StatusCode {
    client
        .get(format!("{}/orders/{order_id}", p.base))
        .send()
        .await
        .expect("get")
        .status()
}

/// Waits until the projection has no parked key.
async fn wait_unparked(p: &Pipeline) {
    let projection = p.config.group("projection");
    herald_test::poll_until("the order unparked", Duration::from_secs(60), async || {
        let keys = parked_keys(p, &projection).await;
        if keys.is_empty() {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await;
}

/// `orders dlq replay|discard` arguments for the projection's letters of `key`.
fn dlq_args(
    p: &Pipeline,
    key: Uuid,
    event_ids: Vec<Uuid>,
    dry_run: bool,
) -> orders::cli::DlqActionArgs {
    orders::cli::DlqActionArgs {
        filter: orders::cli::DlqFilterArgs {
            topic: None,
            group: Some(p.config.group("projection")),
            key: Some(key.to_string()),
            event_type: None,
            class: None,
            since: None,
            until: None,
        },
        event_ids,
        all: false,
        rate: Some(50.0),
        dry_run,
        max_redrives: 2,
        reason: "constraint dropped".into(),
        actor: "tester".into(),
    }
}

/// The projection's letters in the events topic's DLQ, newest per record.
async fn projection_letters(p: &Pipeline) -> Vec<herald_kafka::dlq::DeadLetter> {
    let (config, topic) = (p.kafka.config(), format!("{}.dlq", p.config.topics.events));
    let letters = tokio::task::spawn_blocking(move || {
        herald_kafka::dlq::read_dead_letters(&config, &topic, 100)
    })
    .await
    .expect("task")
    .expect("letters");
    let projection = p.config.group("projection");
    herald_kafka::dlq::latest_per_origin(&letters)
        .into_iter()
        .filter(|l| l.group().as_deref() == Some(projection.as_str()))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_order_created_parks_its_order_and_a_replay_applies_both_in_order() {
    let Some(p) = pipeline().await else { return };
    let publisher =
        Publisher::new(&PublisherConfig::new(p.kafka.brokers(), "/tests")).expect("publisher");
    let client = reqwest::Client::new();
    let Poisoned {
        order_id,
        poison,
        shipped,
        parked,
    } = poison_an_order(&p, &publisher, &client).await;
    // The shipment was never applied to an order that does not exist.
    let status = order_status(&p, &client, order_id).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);

    let ours = projection_letters(&p).await;
    let classes: Vec<Option<String>> = ours.iter().map(|l| l.header("dlq.error_class")).collect();
    assert_eq!(
        classes,
        [Some("permanent".to_owned()), Some("parked".to_owned())],
        "the dead letter, then the record parked behind it"
    );
    assert_eq!(ours[0].event_id(), Some(herald::Event::event_id(&poison)));
    assert_eq!(ours[1].event_id(), Some(herald::Event::event_id(&shipped)));
    assert_eq!(
        ours[1].header("dlq.parked_behind"),
        Some(parked.offsets[0].to_string())
    );

    // A dry run sends nothing; fixing the cause and replaying the order
    // applies its events in their order, once.
    let replay = |dry_run| orders::cli::DlqCommand::Replay(dlq_args(&p, order_id, vec![], dry_run));
    orders::dlq::run(&p.config, replay(true))
        .await
        .expect("dry run");
    assert!(orders::dlq::history(&p.pool, 10)
        .await
        .expect("history")
        .is_empty());
    sqlx::query("ALTER TABLE order_views DROP CONSTRAINT poison")
        .execute(&p.pool)
        .await
        .expect("fix");
    orders::dlq::run(&p.config, replay(false))
        .await
        .expect("replay");
    let view = eventually(
        &client,
        &format!("{}/orders/{order_id}", p.base),
        "the replayed order, shipped",
        |b| b["status"] == "shipped",
    )
    .await;
    assert_eq!(
        view["last_event_id"],
        herald::Event::event_id(&shipped).to_string()
    );
    wait_unparked(&p).await;
    let history = orders::dlq::history(&p.pool, 10).await.expect("history");
    assert_eq!(history.len(), 2, "{history:?}");
    assert!(history
        .iter()
        .all(|h| h["action"] == "replay" && h["actor"] == "tester"));
    // The notifications group handled each event once: the redrive was the
    // projection's alone.
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&p.pool)
        .await
        .expect("notifications");
    assert_eq!(notes, 2);
    // Replaying again finds nothing parked: nothing is sent twice.
    orders::dlq::run(&p.config, replay(false))
        .await
        .expect("replay again");
    assert_eq!(
        orders::dlq::history(&p.pool, 10)
            .await
            .expect("history")
            .len(),
        2
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_failing_is_held_back_by_the_loop_guard_and_can_be_discarded() {
    let Some(p) = pipeline().await else { return };
    let publisher =
        Publisher::new(&PublisherConfig::new(p.kafka.brokers(), "/tests")).expect("publisher");
    let client = reqwest::Client::new();
    let Poisoned {
        order_id, poison, ..
    } = poison_an_order(&p, &publisher, &client).await;
    let poison_id = herald::Event::event_id(&poison);
    let head_redrives = async |p: &Pipeline, n: u32| {
        herald_test::poll_until(
            &format!("the order's first record failed again after redrive {n}"),
            Duration::from_secs(60),
            async || {
                let letters = projection_letters(p).await;
                let head = letters.iter().find(|l| l.event_id() == Some(poison_id));
                match head.map(herald_kafka::dlq::DeadLetter::redrives) {
                    Some(r) if r == n => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    };
    let replay =
        |event_ids| orders::cli::DlqCommand::Replay(dlq_args(&p, order_id, event_ids, false));
    // Not fixed: each replay fails again (the dead letter and the record
    // parked behind it are sent; the second waits, not its turn).
    for n in 1..=2 {
        orders::dlq::run(&p.config, replay(vec![]))
            .await
            .expect("replay");
        head_redrives(&p, n).await;
    }
    let history = |p: &Pipeline| {
        let pool = p.pool.clone();
        async move { orders::dlq::history(&pool, 100).await.expect("history") }
    };
    assert_eq!(history(&p).await.len(), 4);
    // Redriven twice (--max-redrives 2): a replay by key holds it back...
    orders::dlq::run(&p.config, replay(vec![]))
        .await
        .expect("guarded");
    assert_eq!(
        history(&p).await.len(),
        4,
        "nothing sent past the loop guard"
    );
    // ...naming it sends it once more.
    orders::dlq::run(&p.config, replay(vec![poison_id]))
        .await
        .expect("named");
    assert_eq!(history(&p).await.len(), 5);
    head_redrives(&p, 3).await;

    // A person gives up on the order: both records are dropped, unhandled,
    // and the order is unparked.
    orders::dlq::run(
        &p.config,
        orders::cli::DlqCommand::Discard(dlq_args(&p, order_id, vec![], false)),
    )
    .await
    .expect("discard");
    wait_unparked(&p).await;
    let trail = history(&p).await;
    let discards: Vec<&serde_json::Value> =
        trail.iter().filter(|h| h["action"] == "discard").collect();
    assert_eq!(discards.len(), 2, "{trail:?}");
    assert!(discards
        .iter()
        .all(|h| h["reason"] == "constraint dropped" && h["key"] == order_id.to_string()));
    let status = order_status(&p, &client, order_id).await;
    assert_eq!(
        status,
        reqwest::StatusCode::NOT_FOUND,
        "discarded, never applied"
    );
    p.stop().await;
}

/// A relay whose events topic takes smaller record batches than its
/// producer may send does not start: the broker would refuse whole
/// batches, innocent events with the oversized one. The error names the
/// settings on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_does_not_start_on_a_topic_that_refuses_its_batches() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let (Some(kafka), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let config = config_at(kafka.brokers(), &db);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka.config().create().expect("admin");
    let topic = NewTopic::new(&config.topics.events, 3, TopicReplication::Fixed(-1))
        .set("max.message.bytes", "10000");
    for result in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create")
    {
        result.expect("topic created");
    }
    let relay = orders::app::Components {
        relay: true,
        ..orders::app::Components::NONE
    };
    let error = orders::app::Application::build(config.clone(), relay)
        .await
        .err()
        .expect("no start");
    let error = format!("{error:#}");
    assert!(
        error.contains("max.message.bytes") && error.contains("message.max.bytes"),
        "{error}"
    );
    assert!(error.contains(&config.topics.events), "{error}");
    // Held to the topic's limit, the producer's batches fit: it starts.
    let mut fitted = config.clone();
    fitted.kafka_settings = vec![
        ("message.max.bytes".to_owned(), "10000".to_owned()),
        ("batch.size".to_owned(), "10000".to_owned()),
    ];
    orders::app::Application::build(fitted, relay)
        .await
        .expect("a producer held to the topic's limit starts");
    let _ = admin
        .delete_topics(&[&config.topics.events], &AdminOptions::new())
        .await;
}

/// The topics' replication is checked at start-up against
/// ORDERS_TOPIC_REPLICATION_FACTOR / ORDERS_TOPIC_MIN_INSYNC_REPLICAS: left
/// to the cluster (the default) anything passes; asked for more than the
/// cluster has brokers (one on the test broker, three on
/// `services.sh up --kafka-nodes 3`), the start-up fails naming the topic,
/// what it has, what is required and the setting, whether the topics exist
/// already or would have to be created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_checks_the_topics_replication() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let (Some(kafka), Some(postgres)) = (herald_test::kafka(), herald_test::postgres()) else {
        return;
    };
    let db = postgres.database().await;
    let config = config_at(kafka.brokers(), &db);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka.config().create().expect("admin");
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata")
        .brokers()
        .len();
    // More than any topic on this cluster can have.
    let beyond = u16::try_from(brokers + 1).expect("a few brokers");
    let workers = orders::app::Components {
        projection: true,
        ..orders::app::Components::NONE
    };
    orders::app::Application::build(config.clone(), workers)
        .await
        .expect("the cluster's defaults pass");
    let events = config.topics.events.clone();

    let start = |durability: herald_kafka::TopicDurability, config: &orders::app::Config| {
        let config = orders::app::Config {
            topic_durability: durability,
            ..config.clone()
        };
        async move {
            let error = orders::app::Application::build(config, workers)
                .await
                .err()
                .expect("no start");
            format!("{error:#}")
        }
    };
    // Requiring what the topics have passes (on the three-node cluster,
    // replication factor 3 and min.insync.replicas 2).
    let found =
        herald_kafka::describe_replication(&kafka.config(), &[&events], Duration::from_secs(10))
            .await
            .expect("describe")[0]
            .expect("the events topic exists");
    assert!(found.replication_factor >= 1, "{found:?}");
    let as_found = herald_kafka::TopicDurability::cluster_default()
        .replication_factor(u16::try_from(found.replication_factor).expect("a few replicas"))
        .min_insync_replicas(found.min_insync_replicas.expect("the broker says"));
    orders::app::Application::build(
        orders::app::Config {
            topic_durability: as_found,
            ..config.clone()
        },
        workers,
    )
    .await
    .expect("what the topics have passes");
    // The topics exist, with the cluster's replication.
    let more_replicas = herald_kafka::TopicDurability::cluster_default().replication_factor(beyond);
    let error = start(more_replicas, &config).await;
    assert!(
        error.contains(&format!(
            "ORDERS_TOPIC_REPLICATION_FACTOR (--topic-replication-factor) requires replication factor {beyond}, but topic {events} has "
        )),
        "{error}"
    );
    let more_in_sync = herald_kafka::TopicDurability::cluster_default().min_insync_replicas(beyond);
    let error = start(more_in_sync, &config).await;
    assert!(
        error.contains(&format!(
            "ORDERS_TOPIC_MIN_INSYNC_REPLICAS (--topic-min-insync-replicas) requires min.insync.replicas {beyond}, but topic {events} has "
        )),
        "{error}"
    );
    // New topics: the cluster cannot make that many replicas.
    let fresh = config_at(kafka.brokers(), &db);
    let error = start(more_replicas, &fresh).await;
    assert!(
        error.contains(&format!("replication factor {beyond}"))
            && error.contains("ORDERS_TOPIC_REPLICATION_FACTOR"),
        "{error}"
    );

    let names: Vec<String> = [
        events.clone(),
        format!("{events}.dlq"),
        config.fulfillment_topic.clone(),
    ]
    .into_iter()
    .chain(
        orders::fulfillment::Topics::of(&config.fulfillment_topic)
            .internal()
            .map(str::to_owned),
    )
    .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}
