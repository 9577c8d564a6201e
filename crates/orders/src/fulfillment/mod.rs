//! The fulfillment processor: `order-events` → `fulfillment-events`, exactly
//! once (herald's [`Processor`], Kafka transactions).
//!
//! - `OrderCreated` → `InventoryReserved` when every SKU has enough stock
//!   (the stock goes down), else `OrderRejected` (out-of-stock SKUs named).
//! - `OrderCancelled` → `InventoryReleased` for a reserved order (the stock
//!   goes back up); nothing for a rejected or unknown one.
//! - `OrderShipped` → the reservation is settled (no output).
//!
//! # State, and how it survives a restart
//!
//! The stock per SKU and the reservation per order are processor state. Every
//! change is written to a compacted changelog topic (`<output>.stock`,
//! `<output>.reservations`) as one more output of the same Kafka transaction
//! as the events it explains, so state and outputs commit or abort together.
//! At start the processor first fences its previous incarnation (same
//! transactional id), then reads both changelogs `read_committed` to their
//! end: the rebuilt state is exactly what the committed outputs imply, never
//! what an aborted transaction half did.
//!
//! Stock is global (any order may take any SKU) while inputs are partitioned
//! by order id, so the state is correct with ONE active fulfillment instance
//! (a restarted one takes over under the same `--instance-id`). Running
//! several at once would need the orders re-keyed by SKU first.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use herald::HandlerError;
use herald_kafka::processor::{ChangelogRecord, ChangelogTable, Input, Transform};
use herald_kafka::OutgoingRecord;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{OrderEvent, OrderItem};

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

/// Reserved stock went back (the order was cancelled).
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
    /// The input event it answers.
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

/// The changelog topics of the fulfillment state, for an output topic.
pub fn changelog_topics(output: &str) -> [String; 2] {
    [format!("{output}.stock"), format!("{output}.reservations")]
}

/// The topic of the event ids the fulfillment processor completed (its
/// duplicate-input filter, `herald_kafka::processor::dedup`), for an output
/// topic.
pub fn completed_topic(output: &str) -> String {
    format!("{output}.completed")
}

/// Fulfillment settings.
#[derive(Debug, Clone)]
pub struct Stock {
    /// SKUs that are never in stock.
    pub out_of_stock: BTreeSet<String>,
    /// Units of a SKU the first time it is seen.
    pub initial: i64,
}

/// The fulfillment transform and its state.
#[derive(Debug)]
pub struct Fulfillment {
    output: String,
    settings: Stock,
    stock: ChangelogTable<i64>,
    reservations: ChangelogTable<Vec<OrderItem>>,
}

impl Fulfillment {
    /// A transform writing to `output` (`fulfillment-events`).
    pub fn new(output: impl Into<String>, settings: Stock) -> Self {
        let output = output.into();
        let [stock, reservations] = changelog_topics(&output);
        Self {
            output,
            settings,
            stock: ChangelogTable::new(stock),
            reservations: ChangelogTable::new(reservations),
        }
    }

    fn available(&self, sku: &str) -> i64 {
        if self.settings.out_of_stock.contains(sku) {
            return 0;
        }
        self.stock
            .get(sku)
            .copied()
            .unwrap_or(self.settings.initial)
    }

    fn created(
        &mut self,
        e: &crate::domain::OrderCreated,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        // The same SKU may appear on several lines: check the sum.
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for item in &e.items {
            *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
        }
        let short: Vec<String> = wanted
            .iter()
            .filter(|(sku, n)| self.available(sku) < **n)
            .map(|(sku, _)| (*sku).to_owned())
            .collect();
        let now = Utc::now();
        if !short.is_empty() {
            let event = FulfillmentEvent::OrderRejected(OrderRejected {
                event_id: Uuid::new_v4(),
                order_id: e.order_id,
                reason: format!("not enough stock of {}", short.join(", ")),
                out_of_stock: short,
                caused_by: e.event_id,
                timestamp: now,
            });
            return Ok(vec![input.output(&self.output, &event)?]);
        }
        let mut outputs = Vec::with_capacity(wanted.len() + 2);
        for (sku, n) in wanted {
            let left = self.available(sku) - n;
            outputs.push(self.stock.put(sku, left)?);
        }
        outputs.push(
            self.reservations
                .put(e.order_id.to_string(), e.items.clone())?,
        );
        let event = FulfillmentEvent::InventoryReserved(InventoryReserved {
            event_id: Uuid::new_v4(),
            order_id: e.order_id,
            items: e.items.clone(),
            caused_by: e.event_id,
            timestamp: now,
        });
        outputs.push(input.output(&self.output, &event)?);
        Ok(outputs)
    }

    fn cancelled(
        &mut self,
        e: &crate::domain::OrderCancelled,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let key = e.order_id.to_string();
        let Some(items) = self.reservations.get(&key).cloned() else {
            return Ok(Vec::new());
        };
        let mut outputs = Vec::with_capacity(items.len() + 2);
        for item in &items {
            let back = self.available(&item.sku) + i64::from(item.quantity);
            outputs.push(self.stock.put(item.sku.clone(), back)?);
        }
        outputs.push(self.reservations.remove(&key));
        let event = FulfillmentEvent::InventoryReleased(InventoryReleased {
            event_id: Uuid::new_v4(),
            order_id: e.order_id,
            items,
            caused_by: e.event_id,
            timestamp: Utc::now(),
        });
        outputs.push(input.output(&self.output, &event)?);
        Ok(outputs)
    }
}

impl Transform<OrderEvent> for Fulfillment {
    async fn process(
        &mut self,
        event: OrderEvent,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        match &event {
            OrderEvent::OrderCreated(e) => self.created(e, &input),
            OrderEvent::OrderCancelled(e) => self.cancelled(e, &input),
            OrderEvent::OrderShipped(e) => {
                // Shipped: the reserved stock is gone for good.
                let key = e.order_id.to_string();
                Ok(if self.reservations.get(&key).is_some() {
                    vec![self.reservations.remove(&key)]
                } else {
                    Vec::new()
                })
            }
        }
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        self.stock.restore(record)?;
        self.reservations.restore(record)
    }

    fn commit(&mut self) {
        self.stock.commit();
        self.reservations.commit();
    }

    fn rollback(&mut self) {
        self.stock.rollback();
        self.reservations.rollback();
    }
}
