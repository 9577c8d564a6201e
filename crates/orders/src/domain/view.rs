//! What the service answers and the pure steps that build it: the order
//! as the API shows it, the outcomes of the write model's commands, and the
//! events a new order or a transition makes. Both stores share them.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use super::{
    NewOrder, OrderCancelled, OrderCreated, OrderEvent, OrderItem, OrderShipped, OrderStatus,
};

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderView {
    /// Order id.
    pub id: Uuid,
    /// Customer id.
    pub customer_id: Uuid,
    /// ISO 4217 code.
    pub currency: String,
    /// Lines.
    pub items: Vec<OrderItem>,
    /// Sum of the lines.
    pub total: Decimal,
    /// Status.
    pub status: OrderStatus,
    /// Version: 1 when created, +1 per transition.
    pub version: u32,
    /// Why it was cancelled, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// The last event applied (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<Uuid>,
    /// Its type (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_type: Option<String>,
    /// When the order was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When the read model applied the last event (read model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected_at: Option<DateTime<Utc>>,
}

/// Result of `POST /orders`.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A new order.
    Created(Box<OrderView>),
    /// The same Idempotency-Key and request as before: the first answer.
    Replayed {
        /// HTTP status of the first answer.
        status: u16,
        /// Its body.
        body: serde_json::Value,
    },
    /// The Idempotency-Key was used for another request.
    KeyReused,
}

/// Result of a state transition.
#[derive(Debug)]
pub enum TransitionOutcome {
    /// Done; the order after it.
    Done(Box<OrderView>),
    /// No such order.
    NotFound,
    /// The state machine forbids it from the current status.
    Forbidden(OrderStatus),
}

/// The target of a transition.
#[derive(Debug, Clone)]
pub enum Transition {
    /// Ship the order.
    Ship,
    /// Cancel it, with a reason.
    Cancel(String),
}

/// What `to` does to `order` as it stands, on behalf of `owner` (the API's
/// caller, when it is a customer): the status and version it moves to, or
/// the outcome that stops it. An order of another customer is
/// [`TransitionOutcome::NotFound`]: the API does not tell others' orders
/// from missing ones. Both stores apply it to the row they locked.
pub(crate) fn plan_transition(
    order: &OrderView,
    owner: Option<Uuid>,
    to: &Transition,
) -> Result<(OrderStatus, u32), TransitionOutcome> {
    if owner.is_some_and(|owner| owner != order.customer_id) {
        return Err(TransitionOutcome::NotFound);
    }
    let next = match to {
        Transition::Ship => OrderStatus::Shipped,
        Transition::Cancel(_) => OrderStatus::Cancelled,
    };
    if !order.status.can_become(next) {
        return Err(TransitionOutcome::Forbidden(order.status));
    }
    Ok((next, order.version + 1))
}

/// The event of a transition to `version`.
pub(crate) fn transition_event(
    order_id: Uuid,
    to: &Transition,
    version: u32,
    now: DateTime<Utc>,
) -> OrderEvent {
    match to {
        Transition::Ship => OrderEvent::OrderShipped(OrderShipped {
            event_id: Uuid::new_v4(),
            order_id,
            version,
            timestamp: now,
        }),
        Transition::Cancel(reason) => OrderEvent::OrderCancelled(OrderCancelled {
            event_id: Uuid::new_v4(),
            order_id,
            reason: reason.clone(),
            version,
            timestamp: now,
        }),
    }
}

/// The request part an idempotency key is bound to.
pub(crate) fn fingerprint(order: &NewOrder) -> serde_json::Value {
    serde_json::json!({
        "customer_id": order.customer_id,
        "currency": order.currency,
        "items": order.items,
    })
}

/// The answer to a new order, and its `OrderCreated` event.
pub(crate) fn new_order(order: &NewOrder, now: DateTime<Utc>) -> (OrderView, OrderEvent) {
    let order_id = Uuid::now_v7();
    let event = OrderEvent::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        order_id,
        customer_id: order.customer_id,
        items: order.items.clone(),
        total: order.total,
        currency: order.currency.clone(),
        version: 1,
        timestamp: now,
    });
    let view = OrderView {
        id: order_id,
        customer_id: order.customer_id,
        currency: order.currency.clone(),
        items: order.items.clone(),
        total: order.total,
        status: OrderStatus::Created,
        version: 1,
        cancel_reason: None,
        last_event_id: None,
        last_event_type: None,
        created_at: now,
        updated_at: now,
        projected_at: None,
    };
    (view, event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> OrderView {
        let order = NewOrder {
            customer_id: Uuid::new_v4(),
            currency: "EUR".to_owned(),
            items: Vec::new(),
            total: Decimal::ZERO,
        };
        new_order(&order, Utc::now()).0
    }

    #[test]
    fn a_transition_is_planned_from_the_order_as_it_stands() {
        let order = placed();
        let ship = plan_transition(&order, Some(order.customer_id), &Transition::Ship);
        assert!(matches!(ship, Ok((OrderStatus::Shipped, 2))));
        let by_admin = plan_transition(&order, None, &Transition::Cancel("x".into()));
        assert!(matches!(by_admin, Ok((OrderStatus::Cancelled, 2))));
        let stranger = plan_transition(&order, Some(Uuid::new_v4()), &Transition::Ship);
        assert!(matches!(stranger, Err(TransitionOutcome::NotFound)));
        let shipped = OrderView {
            status: OrderStatus::Shipped,
            version: 2,
            ..order
        };
        let again = plan_transition(&shipped, None, &Transition::Cancel("late".into()));
        assert!(matches!(
            again,
            Err(TransitionOutcome::Forbidden(OrderStatus::Shipped))
        ));
    }
}
