//! The fulfillment topology: `order-events` → `fulfillment-events`, exactly
//! once at each hop (herald's [`Processor`](herald_kafka::Processor), Kafka
//! transactions), with its state partitioned so that any number of
//! instances share the work.
//!
//! What it answers, per order, on `fulfillment-events` (keyed by order):
//! - `OrderCreated` → exactly one `InventoryReserved` when every SKU had
//!   enough stock (the stock goes down), else exactly one `OrderRejected`
//!   (the short SKUs named), followed by an `InventoryReleased` of the
//!   lines whose SKUs had already been set aside for it, if any.
//! - `OrderCancelled` of a reserved order → `InventoryReleased` (the stock
//!   goes back up); nothing for a rejected or unknown one. A cancel that
//!   arrives while the order is still being reserved is applied when the
//!   outcome is known: `InventoryReserved` then `InventoryReleased`.
//! - `OrderShipped` → the reservation is settled (no output).
//!
//! # Two steps, two keys
//!
//! Stock is per SKU, orders are keyed by order id: no single partitioning
//! fits both. So fulfillment is two processors joined by internal topics,
//! the way Kafka Streams repartitions:
//!
//! ```text
//! order-events ─┐                                  ┌─> fulfillment-events
//!               ├─> [orders step]  ── <out>.sku-requests (key: SKU) ──> [SKUs step]
//! <out>.sku-answers (key: order) <──────────────────────────────────────────┘
//! ```
//!
//! - The **orders step** ([`orders::OrderStep`], group `<prefix>-fulfillment`)
//!   reads `order-events` and `<out>.sku-answers`, both keyed by order id
//!   and with one partition count, so an order's events and its answers
//!   meet in one partition. Its state is the orders in flight and the
//!   reservations held (`<out>.order-state`). It asks the SKUs step for
//!   each SKU of a new order (`ReserveSku`, keyed by SKU), collects the
//!   answers, and emits the outcome; releases go back as `ReleaseSku`.
//! - The **SKUs step** ([`skus::SkuStep`], group `<prefix>-fulfillment-skus`)
//!   reads `<out>.sku-requests`, keyed by SKU: each SKU's stock lives in
//!   exactly one partition (`<out>.sku-stock`), so reservations of one SKU
//!   are serialized without any global lock. It answers each `ReserveSku`
//!   with `SkuReserved` or `SkuShort` on `<out>.sku-answers`.
//!
//! Every output of a step (its answers, requests, outcomes and state
//! changes) commits in one transaction with the offsets of the inputs that
//! caused it, and each step reads `read_committed`: an aborted attempt is
//! invisible downstream, so each hop is exactly once and the whole is too.
//! State is partitioned like each step's input
//! ([`ProcessorConfig::partitioned_state`](herald_kafka::ProcessorConfig::partitioned_state)):
//! an instance restores a partition's state when the partition is assigned
//! and drops it when it is revoked, so instances with distinct
//! `--instance-id`s may come and go freely.
//!
//! A partial reservation is visible to other orders until it is released:
//! two orders competing for the last units of two SKUs can both be
//! rejected where one-step fulfillment would have reserved one of them.
//! That is the price of not locking the whole stock per order.
//!
//! # Topics
//!
//! All the internal and state topics have the partition count of
//! `order-events` (the processors refuse to start otherwise). They replace
//! the single-instance topology's `<out>.stock`, `<out>.reservations` and
//! `<out>.completed`, which are left alone: a deployment moving to this
//! topology starts its stock from `--initial-stock`, and a cancel of an
//! order reserved before the move releases nothing.

pub mod orders;
pub mod skus;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use herald_kafka::processor::ProcessorStats;
use herald_kafka::{Processor, ProcessorError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::OrderItem;

pub use orders::{OrderStep, OrderStepInput};
pub use skus::SkuStep;

/// Stock was set aside for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct InventoryReserved {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// What was reserved.
    pub items: Vec<OrderItem>,
    /// The input event it answers.
    pub caused_by: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}

/// An order cannot be fulfilled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct OrderRejected {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// Why, for a human.
    pub reason: String,
    /// The SKUs without enough stock.
    pub out_of_stock: Vec<String>,
    /// The input event it answers.
    pub caused_by: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}

/// Reserved stock went back: the order was cancelled, or it was rejected
/// after some of its SKUs had been set aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct InventoryReleased {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// What was released.
    pub items: Vec<OrderItem>,
    /// The input event it answers (the cancel, or the `OrderCreated` of a
    /// rejected order).
    pub caused_by: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}

/// The events on `fulfillment-events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
pub enum FulfillmentEvent {
    /// See [`InventoryReserved`].
    InventoryReserved(InventoryReserved),
    /// See [`OrderRejected`].
    OrderRejected(OrderRejected),
    /// See [`InventoryReleased`].
    InventoryReleased(InventoryReleased),
}

/// The topology's topics besides `order-events` and the output, for an
/// output topic (`fulfillment-events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// The outcomes (`fulfillment-events`).
    pub output: String,
    /// Orders step → SKUs step, keyed by SKU.
    pub sku_requests: String,
    /// SKUs step → orders step, keyed by order.
    pub sku_answers: String,
    /// The orders step's changelog: orders in flight and reservations held.
    pub order_state: String,
    /// The orders step's completed input ids (its duplicate filter).
    pub order_completed: String,
    /// The SKUs step's changelog: stock per SKU.
    pub sku_stock: String,
}

impl Topics {
    /// The topics of the topology writing to `output`.
    pub fn of(output: &str) -> Self {
        Self {
            output: output.to_owned(),
            sku_requests: format!("{output}.sku-requests"),
            sku_answers: format!("{output}.sku-answers"),
            order_state: format!("{output}.order-state"),
            order_completed: format!("{output}.order-completed"),
            sku_stock: format!("{output}.sku-stock"),
        }
    }

    /// The internal and state topics, each with the input's partition count.
    pub fn internal(&self) -> [&str; 5] {
        [
            &self.sku_requests,
            &self.sku_answers,
            &self.order_state,
            &self.order_completed,
            &self.sku_stock,
        ]
    }

    /// The compacted ones among [`Topics::internal`].
    pub fn is_compacted(&self, topic: &str) -> bool {
        [&self.order_state, &self.order_completed, &self.sku_stock]
            .iter()
            .any(|t| t.as_str() == topic)
    }
}

/// Fulfillment settings.
#[derive(Debug, Clone)]
pub struct Stock {
    /// SKUs that are never in stock.
    pub out_of_stock: BTreeSet<String>,
    /// Units of a SKU the first time it is seen.
    pub initial: i64,
}

/// The two processors of one fulfillment instance, run together.
pub struct Topology {
    /// The orders step.
    pub orders: Processor<OrderStepInput, OrderStep>,
    /// The SKUs step.
    pub skus: Processor<SkuRequest, SkuStep>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("orders", &self.orders)
            .field("skus", &self.skus)
            .finish()
    }
}

impl Topology {
    /// The orders step's transactional id, which names the instance.
    pub fn transactional_id(&self) -> String {
        self.orders.transactional_id()
    }

    /// The live counters of both steps (orders, SKUs).
    pub fn stats(&self) -> [Arc<ProcessorStats>; 2] {
        [self.orders.stats(), self.skus.stats()]
    }

    /// Counts into `stats` (from [`Topology::stats`] of an earlier one).
    pub fn with_stats(mut self, [orders, skus]: [Arc<ProcessorStats>; 2]) -> Self {
        self.orders = self.orders.with_stats(orders);
        self.skus = self.skus.with_stats(skus);
        self
    }

    /// Runs both steps until `shutdown` completes or one of them stops on
    /// an error; then the other is stopped too (it commits what it has) and
    /// the first error is returned.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProcessorError> {
        let stop = CancellationToken::new();
        let mut orders = std::pin::pin!(self.orders.run(stop.clone().cancelled_owned()));
        let mut skus = std::pin::pin!(self.skus.run(stop.clone().cancelled_owned()));
        tokio::select! {
            () = shutdown => {
                stop.cancel();
                let (orders, skus) = tokio::join!(orders, skus);
                orders.and(skus)
            }
            ended = &mut orders => {
                stop.cancel();
                ended.and(skus.await)
            }
            ended = &mut skus => {
                stop.cancel();
                ended.and(orders.await)
            }
        }
    }
}

/// Asks for, or gives back, units of one SKU (orders step → SKUs step, on
/// `<out>.sku-requests`, keyed by SKU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "sku")]
pub enum SkuRequest {
    /// Take units if there are enough; answered on `<out>.sku-answers`.
    ReserveSku(SkuChange),
    /// Put units back (never answered).
    ReleaseSku(SkuChange),
}

/// The body of a [`SkuRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct SkuChange {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The SKU (the key).
    #[event(key)]
    pub sku: String,
    /// Units.
    pub quantity: i64,
    /// The order asking.
    pub order_id: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}

/// The SKUs step's answer to a `ReserveSku` (on `<out>.sku-answers`, keyed
/// by order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
pub enum SkuAnswer {
    /// See [`SkuReserved`].
    SkuReserved(SkuReserved),
    /// See [`SkuShort`].
    SkuShort(SkuShort),
}

/// The units were set aside for the order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct SkuReserved {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order (the key).
    #[event(key)]
    pub order_id: Uuid,
    /// The SKU.
    pub sku: String,
    /// Units set aside.
    pub quantity: i64,
    /// The `ReserveSku` it answers.
    pub caused_by: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}

/// Not enough units: nothing was set aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct SkuShort {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order (the key).
    #[event(key)]
    pub order_id: Uuid,
    /// The SKU.
    pub sku: String,
    /// Units asked for.
    pub wanted: i64,
    /// Units there were.
    pub available: i64,
    /// The `ReserveSku` it answers.
    pub caused_by: Uuid,
    /// When.
    #[event(time)]
    pub timestamp: chrono::DateTime<Utc>,
}
