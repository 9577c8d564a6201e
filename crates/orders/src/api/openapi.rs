//! `/openapi.json`: the OpenAPI 3.1 description of the routes in
//! [`super::router`]. A test checks that every documented operation exists.

use axum::Json;
use serde_json::{json, Value};

/// Every documented (method, path): the test walks this list.
pub const OPERATIONS: &[(&str, &str)] = &[
    ("post", "/orders"),
    ("get", "/orders"),
    ("get", "/orders/{id}"),
    ("post", "/orders/{id}/ship"),
    ("post", "/orders/{id}/cancel"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// The 503 every database-backed route can answer.
const UNAVAILABLE: &str =
    "the database is unreachable; retry after the Retry-After header's seconds";

/// The document.
pub fn spec() -> Value {
    let errors = |codes: &[(&str, &str)]| -> Value {
        let mut map = serde_json::Map::new();
        for (code, description) in codes {
            map.insert((*code).to_owned(), error_response(description));
        }
        Value::Object(map)
    };
    let order = json!({ "description": "the order", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Order" } } } });
    let id_param = json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } });
    let mut create_responses = errors(&[
        ("400", "malformed JSON, invalid UTF-8, bad Idempotency-Key"),
        ("408", "the request (body upload included) took over 10 s"),
        ("413", "body over 64 KiB"),
        ("415", "not application/json"),
        (
            "422",
            "invalid fields, or an Idempotency-Key reused for another request",
        ),
        ("503", UNAVAILABLE),
    ]);
    create_responses["201"] = order.clone();
    let mut transition_responses = errors(&[
        ("400", "invalid order id or body"),
        ("404", "no such order"),
        ("409", "the state machine forbids this transition"),
        ("503", UNAVAILABLE),
    ]);
    transition_responses["200"] = order.clone();
    let mut get_responses = errors(&[
        ("400", "invalid order id"),
        ("404", "not in the read model (yet)"),
        ("503", UNAVAILABLE),
    ]);
    get_responses["200"] = order;
    json!({
        "openapi": "3.1.0",
        "info": { "title": "orders (herald reference service)", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/orders": {
                "post": {
                    "summary": "Place an order (write model + outbox, one transaction)",
                    "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "maxLength": 200 } }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreateOrder" } } } },
                    "responses": create_responses
                },
                "get": {
                    "summary": "A customer's orders, from the read model",
                    "parameters": [
                        { "name": "customer_id", "in": "query", "required": true, "schema": { "type": "string", "format": "uuid" } },
                        { "name": "limit", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }
                    ],
                    "responses": {
                        "200": { "description": "the orders", "content": { "application/json": { "schema": { "type": "object", "properties": { "orders": { "type": "array", "items": { "$ref": "#/components/schemas/Order" } } } } } } },
                        "400": error_response("missing or invalid parameter")
                    }
                }
            },
            "/orders/{id}": { "get": { "summary": "One order, from the read model (eventually consistent)", "parameters": [id_param.clone()], "responses": get_responses } },
            "/orders/{id}/ship": { "post": { "summary": "Ship an order (created → shipped)", "parameters": [id_param.clone()], "responses": transition_responses.clone() } },
            "/orders/{id}/cancel": {
                "post": {
                    "summary": "Cancel an order (created → cancelled)",
                    "parameters": [id_param],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CancelOrder" } } } },
                    "responses": transition_responses
                }
            },
            "/healthz": { "get": { "summary": "The process is alive", "responses": { "200": { "description": "alive" } } } },
            "/readyz": { "get": { "summary": "Database and Kafka are reachable", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text exposition format" } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } }
        },
        "components": { "schemas": {
            "CreateOrder": {
                "type": "object", "additionalProperties": false,
                "required": ["customer_id", "currency", "items"],
                "properties": {
                    "customer_id": { "type": "string", "format": "uuid" },
                    "currency": { "type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code" },
                    "items": { "type": "array", "minItems": 1, "maxItems": 100, "items": { "$ref": "#/components/schemas/CreateOrderItem" } }
                }
            },
            "CreateOrderItem": {
                "type": "object", "additionalProperties": false,
                "required": ["sku", "quantity", "unit_price"],
                "properties": {
                    "sku": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9._-]+$" },
                    "quantity": { "type": "integer", "minimum": 1, "maximum": 10000 },
                    "unit_price": { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$", "description": "decimal string, at most the currency's minor digits" }
                }
            },
            "CancelOrder": {
                "type": "object", "additionalProperties": false, "required": ["reason"],
                "properties": { "reason": { "type": "string", "minLength": 1, "maxLength": 500 } }
            },
            "OrderItem": {
                "type": "object",
                "properties": { "sku": { "type": "string" }, "quantity": { "type": "integer" }, "unit_price": { "type": "string" } }
            },
            "Order": {
                "type": "object",
                "properties": {
                    "id": { "type": "string", "format": "uuid" },
                    "customer_id": { "type": "string", "format": "uuid" },
                    "currency": { "type": "string" },
                    "items": { "type": "array", "items": { "$ref": "#/components/schemas/OrderItem" } },
                    "total": { "type": "string" },
                    "status": { "type": "string", "enum": ["created", "shipped", "cancelled"] },
                    "version": { "type": "integer" },
                    "cancel_reason": { "type": "string" },
                    "last_event_id": { "type": "string", "format": "uuid" },
                    "last_event_type": { "type": "string" },
                    "created_at": { "type": "string", "format": "date-time" },
                    "updated_at": { "type": "string", "format": "date-time" },
                    "projected_at": { "type": "string", "format": "date-time" }
                }
            },
            "Error": {
                "type": "object", "required": ["error"],
                "properties": { "error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {
                        "code": { "type": "string" },
                        "message": { "type": "string" },
                        "details": { "type": "array", "items": { "type": "object", "properties": { "field": { "type": "string" }, "message": { "type": "string" } } } }
                    }
                } }
            }
        } }
    })
}

/// `GET /openapi.json`
pub async fn document() -> Json<Value> {
    Json(spec())
}
