//! The read model's and the notifications' rules, without SQL: what an
//! event does to an order's row, and the text it is announced with. Both
//! stores apply them in their own dialect.

use chrono::{DateTime, Utc};
use herald::HandlerError;

use super::{OrderEvent, OrderStatus};

/// A transition of an order's read-model row.
pub(crate) struct ViewChange<'a> {
    /// The new status.
    pub next: OrderStatus,
    /// The cancellation reason, if any.
    pub reason: Option<&'a str>,
    /// When the event happened.
    pub at: DateTime<Utc>,
}

/// What a shipped/cancelled event does to a read-model row in `current`
/// (status, version): `None` when the row already reflects it.
///
/// Events of one order arrive in order (one key, one partition, sequential
/// handling), but a replay or a hand-made record can break that: an event
/// whose predecessor is missing is a transient failure (retried a bounded
/// number of times, then dead-lettered); an impossible transition is
/// permanent.
pub(crate) fn projection_step(
    current: Option<(String, u32)>,
    event: &OrderEvent,
) -> Result<Option<ViewChange<'_>>, HandlerError> {
    let event_type = herald::Event::event_type(event);
    let Some((status, version)) = current else {
        return Err(HandlerError::transient(format!(
            "{event_type} for order {} before its OrderCreated",
            event.order_id()
        )));
    };
    if version >= event.version() {
        return Ok(None);
    }
    if version + 1 != event.version() {
        return Err(HandlerError::transient(format!(
            "{event_type} v{} for order {} arrived before v{}",
            event.version(),
            event.order_id(),
            version + 1
        )));
    }
    let (next, reason, at) = match event {
        OrderEvent::OrderShipped(e) => (OrderStatus::Shipped, None, e.timestamp),
        OrderEvent::OrderCancelled(e) => {
            (OrderStatus::Cancelled, Some(e.reason.as_str()), e.timestamp)
        }
        OrderEvent::OrderCreated(_) => return Ok(None),
    };
    let from = OrderStatus::parse(&status).unwrap_or(OrderStatus::Created);
    if !from.can_become(next) {
        return Err(HandlerError::permanent(format!(
            "{event_type} for order {} in status {}",
            event.order_id(),
            from.as_str()
        )));
    }
    Ok(Some(ViewChange { next, reason, at }))
}

/// The notification of one event: its kind and text (a stand-in for the
/// e-mail a real service would send).
pub(crate) fn notification_text(event: &OrderEvent) -> (&'static str, String) {
    match event {
        OrderEvent::OrderCreated(e) => (
            "order_created",
            format!(
                "Thank you! Order {} for {} {} is placed.",
                e.order_id, e.total, e.currency
            ),
        ),
        OrderEvent::OrderShipped(e) => (
            "order_shipped",
            format!("Order {} is on its way.", e.order_id),
        ),
        OrderEvent::OrderCancelled(e) => (
            "order_cancelled",
            format!("Order {} was cancelled: {}", e.order_id, e.reason),
        ),
    }
}
