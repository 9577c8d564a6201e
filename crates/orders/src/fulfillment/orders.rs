//! The orders step: orders in flight and reservations held, partitioned by
//! order.
//!
//! An order is *reserving* from its `OrderCreated` until every SKU it asked
//! for has answered, then *reserved* (kept until it ships or is cancelled)
//! or forgotten (rejected). A cancel or a shipment that arrives while it is
//! reserving is remembered and applied once the outcome is out, so an
//! order's events on `fulfillment-events` keep the order of its own.

use std::collections::BTreeMap;

use chrono::Utc;
use herald::HandlerError;
use herald_kafka::processor::{ChangelogRecord, ChangelogTable, Input, Transform};
use herald_kafka::OutgoingRecord;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    FulfillmentEvent, InventoryReleased, InventoryReserved, OrderRejected, SkuChange, SkuRequest,
    SkuReserved, SkuShort, Topics,
};
use crate::domain::{OrderCancelled, OrderCreated, OrderItem, OrderShipped};

/// What the orders step reads: the order events and the SKUs' answers,
/// both keyed by order id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
pub enum OrderStepInput {
    /// From `order-events`.
    OrderCreated(OrderCreated),
    /// From `order-events`.
    OrderShipped(OrderShipped),
    /// From `order-events`.
    OrderCancelled(OrderCancelled),
    /// From `<out>.sku-answers`.
    SkuReserved(SkuReserved),
    /// From `<out>.sku-answers`.
    SkuShort(SkuShort),
}

/// One order the step holds (the value of `<out>.order-state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOrder {
    /// The order's lines.
    pub items: Vec<OrderItem>,
    /// The `OrderCreated` event.
    pub created_by: Uuid,
    /// Units asked for per SKU and not answered yet; empty once reserved.
    pub waiting: BTreeMap<String, i64>,
    /// Units set aside per SKU.
    pub reserved: BTreeMap<String, i64>,
    /// SKUs that answered short.
    pub short: Vec<String>,
    /// The cancel that arrived while reserving.
    pub cancelled_by: Option<Uuid>,
    /// Whether it shipped while reserving.
    pub shipped: bool,
}

impl HeldOrder {
    /// The lines whose SKU is set aside.
    fn reserved_items(&self) -> Vec<OrderItem> {
        self.items
            .iter()
            .filter(|item| self.reserved.contains_key(&item.sku))
            .cloned()
            .collect()
    }
}

/// The orders step's transform and its state.
#[derive(Debug)]
pub struct OrderStep {
    output: String,
    requests: String,
    orders: ChangelogTable<HeldOrder>,
}

impl OrderStep {
    /// The step of the topology with `topics`.
    pub fn new(topics: &Topics) -> Self {
        Self {
            output: topics.output.clone(),
            requests: topics.sku_requests.clone(),
            orders: ChangelogTable::new(&topics.order_state),
        }
    }

    fn request(
        &self,
        input: &Input,
        order_id: Uuid,
        sku: &str,
        quantity: i64,
        release: bool,
    ) -> Result<OutgoingRecord, HandlerError> {
        let change = SkuChange {
            event_id: Uuid::new_v4(),
            sku: sku.to_owned(),
            quantity,
            order_id,
            timestamp: Utc::now(),
        };
        let request = if release {
            SkuRequest::ReleaseSku(change)
        } else {
            SkuRequest::ReserveSku(change)
        };
        input.output(&self.requests, &request)
    }

    /// `ReleaseSku` for every SKU `order` holds, and the public
    /// `InventoryReleased` caused by `caused_by`.
    fn release_all(
        &self,
        input: &Input,
        order_id: Uuid,
        order: &HeldOrder,
        caused_by: Uuid,
        outputs: &mut Vec<OutgoingRecord>,
    ) -> Result<(), HandlerError> {
        for (sku, quantity) in &order.reserved {
            outputs.push(self.request(input, order_id, sku, *quantity, true)?);
        }
        let event = FulfillmentEvent::InventoryReleased(InventoryReleased {
            event_id: Uuid::new_v4(),
            order_id,
            items: order.reserved_items(),
            caused_by,
            timestamp: Utc::now(),
        });
        outputs.push(input.output(&self.output, &event)?);
        Ok(())
    }

    fn created(
        &mut self,
        e: &OrderCreated,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let key = e.order_id.to_string();
        if self.orders.get(&key).is_some() {
            // Already under way (the same order created twice cannot
            // happen; a replayed event is caught by the duplicate filter).
            return Ok(Vec::new());
        }
        // The same SKU may appear on several lines: one request for the sum.
        let mut waiting: BTreeMap<String, i64> = BTreeMap::new();
        for item in &e.items {
            *waiting.entry(item.sku.clone()).or_default() += i64::from(item.quantity);
        }
        let mut outputs = Vec::with_capacity(waiting.len() + 2);
        for (sku, quantity) in &waiting {
            outputs.push(self.request(input, e.order_id, sku, *quantity, false)?);
        }
        let order = HeldOrder {
            items: e.items.clone(),
            created_by: e.event_id,
            waiting,
            reserved: BTreeMap::new(),
            short: Vec::new(),
            cancelled_by: None,
            shipped: false,
        };
        self.settle(input, e.order_id, order, &mut outputs)?;
        Ok(outputs)
    }

    /// Writes `order` back, or, when its last answer is in, its outcome
    /// (and what a cancel or shipment during the reservation asked for).
    fn settle(
        &mut self,
        input: &Input,
        order_id: Uuid,
        order: HeldOrder,
        outputs: &mut Vec<OutgoingRecord>,
    ) -> Result<(), HandlerError> {
        let key = order_id.to_string();
        if !order.waiting.is_empty() {
            outputs.push(self.orders.put_in(input.partition, key, order)?);
            return Ok(());
        }
        let now = Utc::now();
        if !order.short.is_empty() {
            let mut short = order.short.clone();
            short.sort();
            let event = FulfillmentEvent::OrderRejected(OrderRejected {
                event_id: Uuid::new_v4(),
                order_id,
                reason: format!("not enough stock of {}", short.join(", ")),
                out_of_stock: short,
                caused_by: order.created_by,
                timestamp: now,
            });
            outputs.push(input.output(&self.output, &event)?);
            if !order.reserved.is_empty() {
                self.release_all(input, order_id, &order, order.created_by, outputs)?;
            }
            outputs.push(self.orders.remove_in(input.partition, &key));
            return Ok(());
        }
        let event = FulfillmentEvent::InventoryReserved(InventoryReserved {
            event_id: Uuid::new_v4(),
            order_id,
            items: order.items.clone(),
            caused_by: order.created_by,
            timestamp: now,
        });
        outputs.push(input.output(&self.output, &event)?);
        if let Some(cancel) = order.cancelled_by {
            self.release_all(input, order_id, &order, cancel, outputs)?;
            outputs.push(self.orders.remove_in(input.partition, &key));
        } else if order.shipped {
            outputs.push(self.orders.remove_in(input.partition, &key));
        } else {
            outputs.push(self.orders.put_in(input.partition, key, order)?);
        }
        Ok(())
    }

    fn answered(
        &mut self,
        input: &Input,
        order_id: Uuid,
        sku: &str,
        reserved: Option<i64>,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let mut outputs = Vec::new();
        let order = self.orders.get(&order_id.to_string()).cloned();
        let Some(mut order) = order.filter(|o| o.waiting.contains_key(sku)) else {
            // An answer nothing waits for: give back what it set aside, so
            // no stock leaks.
            tracing::warn!(%order_id, sku, "a SKU answer no order waits for");
            if let Some(quantity) = reserved {
                outputs.push(self.request(input, order_id, sku, quantity, true)?);
            }
            return Ok(outputs);
        };
        order.waiting.remove(sku);
        match reserved {
            Some(quantity) => {
                order.reserved.insert(sku.to_owned(), quantity);
            }
            None => order.short.push(sku.to_owned()),
        }
        self.settle(input, order_id, order, &mut outputs)?;
        Ok(outputs)
    }

    fn cancelled(
        &mut self,
        e: &OrderCancelled,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let key = e.order_id.to_string();
        let Some(mut order) = self.orders.get(&key).cloned() else {
            return Ok(Vec::new());
        };
        let mut outputs = Vec::new();
        if order.waiting.is_empty() {
            self.release_all(input, e.order_id, &order, e.event_id, &mut outputs)?;
            outputs.push(self.orders.remove_in(input.partition, &key));
        } else {
            order.cancelled_by = Some(e.event_id);
            outputs.push(self.orders.put_in(input.partition, key, order)?);
        }
        Ok(outputs)
    }

    fn shipped(
        &mut self,
        e: &OrderShipped,
        input: &Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        let key = e.order_id.to_string();
        let Some(mut order) = self.orders.get(&key).cloned() else {
            return Ok(Vec::new());
        };
        // Shipped: the reserved stock is gone for good.
        Ok(vec![if order.waiting.is_empty() {
            self.orders.remove_in(input.partition, &key)
        } else {
            order.shipped = true;
            self.orders.put_in(input.partition, key, order)?
        }])
    }
}

impl Transform<OrderStepInput> for OrderStep {
    async fn process(
        &mut self,
        event: OrderStepInput,
        input: Input,
    ) -> Result<Vec<OutgoingRecord>, HandlerError> {
        match &event {
            OrderStepInput::OrderCreated(e) => self.created(e, &input),
            OrderStepInput::OrderCancelled(e) => self.cancelled(e, &input),
            OrderStepInput::OrderShipped(e) => self.shipped(e, &input),
            OrderStepInput::SkuReserved(a) => {
                self.answered(&input, a.order_id, &a.sku, Some(a.quantity))
            }
            OrderStepInput::SkuShort(a) => self.answered(&input, a.order_id, &a.sku, None),
        }
    }

    fn restore(&mut self, record: &ChangelogRecord) -> Result<(), HandlerError> {
        self.orders.restore(record)
    }

    fn commit(&mut self) {
        self.orders.commit();
    }

    fn rollback(&mut self) {
        self.orders.rollback();
    }

    fn revoked(&mut self, partitions: &[i32]) {
        self.orders.drop_partitions(partitions);
    }
}
