//! The order domain: events, the state machine, validated inputs, and the
//! model and rules both stores share. Nothing here knows SQL or Kafka.
//!
//! Inputs are parsed into domain types once, at the edge ([`NewOrder::parse`]),
//! so everything past the API works with values that are already valid.
//!
//! # Layout
//! - this file: the events ([`OrderEvent`]), the state machine
//!   ([`OrderStatus`]), the requests and their validation ([`NewOrder`]).
//! - [`view`]: the order as the API shows it ([`OrderView`]), the commands'
//!   outcomes, and the events a new order or a transition makes.
//! - `rules`: what an event does to the read model, and its notification.

mod rules;
pub mod view;

pub(crate) use rules::{notification_text, projection_step, ViewChange};
pub(crate) use view::{fingerprint, new_order, plan_transition, transition_event};
pub use view::{CreateOutcome, OrderView, Transition, TransitionOutcome};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The CloudEvents source of this service's events.
pub const SOURCE: &str = "/orders";

/// Where the service's events go.
#[derive(Debug, Clone)]
pub struct Topics {
    /// The order events topic (`order-events`).
    pub events: String,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    /// Stock keeping unit.
    pub sku: String,
    /// How many (at least 1).
    pub quantity: u32,
    /// Price of one unit, in the order's currency.
    pub unit_price: Decimal,
}

/// An order was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct OrderCreated {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_id: Uuid,
    /// What was ordered.
    pub items: Vec<OrderItem>,
    /// Sum of quantity × unit price.
    pub total: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// The order's version after this event (1).
    pub version: u32,
    /// When it happened.
    #[event(time)]
    pub timestamp: DateTime<Utc>,
}

/// An order was shipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct OrderShipped {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// The order's version after this event.
    pub version: u32,
    /// When it happened.
    #[event(time)]
    pub timestamp: DateTime<Utc>,
}

/// An order was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::EventPayload)]
pub struct OrderCancelled {
    /// Event id.
    #[event(id)]
    pub event_id: Uuid,
    /// The order.
    #[event(key)]
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
    /// The order's version after this event.
    pub version: u32,
    /// When it happened.
    #[event(time)]
    pub timestamp: DateTime<Utc>,
}

/// The events of an order, on the `order-events` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, herald::Event)]
#[serde(tag = "event_type")]
#[event(aggregate = "order")]
pub enum OrderEvent {
    /// See [`OrderCreated`].
    OrderCreated(OrderCreated),
    /// See [`OrderShipped`].
    OrderShipped(OrderShipped),
    /// See [`OrderCancelled`].
    OrderCancelled(OrderCancelled),
}

impl OrderEvent {
    /// The order the event belongs to.
    pub fn order_id(&self) -> Uuid {
        match self {
            OrderEvent::OrderCreated(e) => e.order_id,
            OrderEvent::OrderShipped(e) => e.order_id,
            OrderEvent::OrderCancelled(e) => e.order_id,
        }
    }

    /// The order's version after the event.
    pub fn version(&self) -> u32 {
        match self {
            OrderEvent::OrderCreated(e) => e.version,
            OrderEvent::OrderShipped(e) => e.version,
            OrderEvent::OrderCancelled(e) => e.version,
        }
    }
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed, not yet shipped or cancelled.
    Created,
    /// Shipped (final).
    Shipped,
    /// Cancelled (final).
    Cancelled,
}

impl OrderStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Created => "created",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(OrderStatus::Created),
            "shipped" => Some(OrderStatus::Shipped),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }

    /// Whether moving to `next` is allowed: created → shipped | cancelled.
    pub fn can_become(self, next: OrderStatus) -> bool {
        matches!(
            (self, next),
            (OrderStatus::Created, OrderStatus::Shipped)
                | (OrderStatus::Created, OrderStatus::Cancelled)
        )
    }
}

/// Limits on an order request.
pub mod limits {
    /// Items per order.
    pub const MAX_ITEMS: usize = 100;
    /// Characters in a SKU.
    pub const MAX_SKU_LEN: usize = 64;
    /// Units per line.
    pub const MAX_QUANTITY: u32 = 10_000;
    /// Largest unit price.
    pub const MAX_UNIT_PRICE: i64 = 1_000_000_000;
    /// Characters in a cancellation reason.
    pub const MAX_REASON_LEN: usize = 500;
    /// Characters in an Idempotency-Key.
    pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;
    /// Bytes in a request body.
    pub const MAX_BODY_BYTES: usize = 64 * 1024;
}

/// ISO 4217 codes this service accepts, with their minor-unit digits.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NGN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PEN", 2),
    ("PHP", 2),
    ("PLN", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

/// The minor-unit digits of an accepted ISO 4217 currency.
pub fn currency_minor_digits(code: &str) -> Option<u32> {
    CURRENCIES.iter().find(|(c, _)| *c == code).map(|(_, d)| *d)
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the field, e.g. `items[0].unit_price`.
    pub field: String,
    /// What is wrong, for a human.
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A text that PostgreSQL can store and a log can show: no NUL and no other
/// control characters than tab and newline.
fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &str, max_chars: usize) {
    if value.chars().any(|c| c == '\0') {
        errors.push(field_error(field, "must not contain NUL characters"));
    } else if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        errors.push(field_error(field, "must not contain control characters"));
    }
    if value.chars().count() > max_chars {
        errors.push(field_error(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
}

/// The body of `POST /orders`, as received.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// The customer's UUID.
    pub customer_id: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The lines.
    pub items: Vec<CreateOrderItem>,
}

/// One line of `POST /orders`, as received.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderItem {
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: u32,
    /// Unit price as a decimal string, e.g. `"12.50"` (never a JSON number:
    /// binary floats cannot hold money exactly).
    pub unit_price: String,
}

/// The body of `POST /orders/{id}/cancel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelOrderRequest {
    /// Why the order is cancelled.
    pub reason: String,
}

/// A validated new order.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOrder {
    /// Who places it.
    pub customer_id: Uuid,
    /// ISO 4217 code.
    pub currency: String,
    /// The lines.
    pub items: Vec<OrderItem>,
    /// Sum of the lines.
    pub total: Decimal,
}

impl NewOrder {
    /// Validates a request; every problem is reported, not just the first.
    pub fn parse(request: &CreateOrderRequest) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        check_text(&mut errors, "customer_id", &request.customer_id, 36);
        let customer_id = match Uuid::parse_str(&request.customer_id) {
            Ok(id) => Some(id),
            Err(_) => {
                errors.push(field_error("customer_id", "must be a UUID"));
                None
            }
        };
        let minor_digits = currency_minor_digits(&request.currency);
        if minor_digits.is_none() {
            check_text(&mut errors, "currency", &request.currency, 3);
            errors.push(field_error(
                "currency",
                "must be a supported ISO 4217 code, e.g. EUR",
            ));
        }
        if request.items.is_empty() {
            errors.push(field_error("items", "must contain at least one item"));
        }
        if request.items.len() > limits::MAX_ITEMS {
            errors.push(field_error(
                "items",
                format!("must contain at most {} items", limits::MAX_ITEMS),
            ));
        }
        let mut items = Vec::with_capacity(request.items.len());
        let mut total = Decimal::ZERO;
        for (i, item) in request.items.iter().enumerate() {
            let at = |name: &str| format!("items[{i}].{name}");
            let sku_ok = !item.sku.is_empty()
                && item
                    .sku
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !sku_ok {
                check_text(&mut errors, &at("sku"), &item.sku, limits::MAX_SKU_LEN);
                errors.push(field_error(
                    at("sku"),
                    "must be 1+ characters of A-Z, a-z, 0-9, '-', '_', '.'",
                ));
            } else if item.sku.len() > limits::MAX_SKU_LEN {
                errors.push(field_error(
                    at("sku"),
                    format!("must be at most {} characters", limits::MAX_SKU_LEN),
                ));
            }
            if item.quantity == 0 || item.quantity > limits::MAX_QUANTITY {
                errors.push(field_error(
                    at("quantity"),
                    format!("must be between 1 and {}", limits::MAX_QUANTITY),
                ));
            }
            let price = parse_price(&item.unit_price, minor_digits);
            match price {
                Ok(price) => {
                    total += price * Decimal::from(item.quantity);
                    items.push(OrderItem {
                        sku: item.sku.clone(),
                        quantity: item.quantity,
                        unit_price: price,
                    });
                }
                Err(message) => errors.push(field_error(at("unit_price"), message)),
            }
        }
        if let Some(digits) = minor_digits {
            // Money shows the currency's minor digits: 25.90 EUR, 1000 JPY.
            total.rescale(digits);
            for item in &mut items {
                item.unit_price.rescale(digits);
            }
        }
        match (customer_id, errors.is_empty()) {
            (Some(customer_id), true) => Ok(NewOrder {
                customer_id,
                currency: request.currency.clone(),
                items,
                total,
            }),
            _ => Err(errors),
        }
    }
}

fn parse_price(text: &str, minor_digits: Option<u32>) -> Result<Decimal, String> {
    let well_formed = !text.is_empty()
        && text.len() <= 20
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.chars().filter(|c| *c == '.').count() <= 1
        && !text.starts_with('.')
        && !text.ends_with('.');
    if !well_formed {
        return Err("must be a non-negative decimal string like \"12.50\"".to_owned());
    }
    let price: Decimal = text
        .parse()
        .map_err(|_| "must be a non-negative decimal string like \"12.50\"".to_owned())?;
    if price > Decimal::from(limits::MAX_UNIT_PRICE) {
        return Err(format!("must be at most {}", limits::MAX_UNIT_PRICE));
    }
    if let Some(digits) = minor_digits {
        if price.scale() > digits {
            return Err(format!(
                "has more than {digits} decimal places for this currency"
            ));
        }
    }
    Ok(price)
}

/// Validates a cancellation reason.
pub fn parse_reason(request: &CancelOrderRequest) -> Result<String, Vec<FieldError>> {
    let mut errors = Vec::new();
    let reason = request.reason.trim();
    if reason.is_empty() {
        errors.push(field_error("reason", "must not be empty"));
    }
    check_text(&mut errors, "reason", reason, limits::MAX_REASON_LEN);
    if errors.is_empty() {
        Ok(reason.to_owned())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: Vec<(&str, u32, &str)>) -> CreateOrderRequest {
        CreateOrderRequest {
            customer_id: Uuid::new_v4().to_string(),
            currency: "EUR".into(),
            items: items
                .into_iter()
                .map(|(sku, quantity, price)| CreateOrderItem {
                    sku: sku.into(),
                    quantity,
                    unit_price: price.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn computes_the_total_exactly() {
        let order =
            NewOrder::parse(&request(vec![("A-1", 3, "0.10"), ("B", 1, "19.99")])).expect("valid");
        assert_eq!(order.total, "20.29".parse::<Decimal>().expect("decimal"));
    }

    #[test]
    fn reports_every_invalid_field() {
        let mut r = request(vec![("", 0, "1.234"), ("ok", 1, "-1"), ("x", 1, "1e3")]);
        r.customer_id = "nope".into();
        r.currency = "XYZ".into();
        let errors = NewOrder::parse(&r).expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "customer_id",
                "currency",
                "items[0].sku",
                "items[0].quantity",
                "items[1].unit_price",
                "items[2].unit_price"
            ]
        );
    }

    #[test]
    fn respects_the_currency_minor_digits() {
        let mut r = request(vec![("A", 1, "100.5")]);
        r.currency = "JPY".into();
        assert!(NewOrder::parse(&r).is_err());
        r.items[0].unit_price = "100".into();
        assert!(NewOrder::parse(&r).is_ok());
        r.currency = "KWD".into();
        r.items[0].unit_price = "1.125".into();
        assert!(NewOrder::parse(&r).is_ok());
    }

    #[test]
    fn rejects_nul_and_overlong_text() {
        assert!(parse_reason(&CancelOrderRequest {
            reason: "a\0b".into()
        })
        .is_err());
        assert!(parse_reason(&CancelOrderRequest {
            reason: "x".repeat(501)
        })
        .is_err());
        assert!(parse_reason(&CancelOrderRequest {
            reason: "  ".into()
        })
        .is_err());
        assert_eq!(
            parse_reason(&CancelOrderRequest {
                reason: " changed my mind ".into()
            })
            .expect("ok"),
            "changed my mind"
        );
    }

    #[test]
    fn state_machine_allows_only_forward_moves() {
        use OrderStatus::*;
        assert!(Created.can_become(Shipped));
        assert!(Created.can_become(Cancelled));
        assert!(!Shipped.can_become(Cancelled));
        assert!(!Cancelled.can_become(Shipped));
        assert!(!Shipped.can_become(Shipped));
    }
}
