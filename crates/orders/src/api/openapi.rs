//! `/openapi.json`: the OpenAPI 3.1 description of the routes in
//! [`super::router`]. A test checks that every documented operation exists.
//! The order operations carry the `bearerAuth` security requirement and
//! their 401/403 answers (see [`super::auth`]); the operations routes are
//! open.

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

/// The 401 of every order route with `--auth jwt`.
const UNAUTHORIZED: &str = "no bearer token (`unauthorized`), or one that does not verify (`invalid_token`, `token_expired`); see the WWW-Authenticate header";

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
    let secured = json!([{ "bearerAuth": [] }]);
    let mut create_responses = errors(&[
        ("400", "malformed JSON, invalid UTF-8, bad Idempotency-Key"),
        ("401", UNAUTHORIZED),
        ("403", "`forbidden`: customer_id is not the token's subject"),
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
    let mut ship_responses = errors(&[
        ("400", "invalid order id"),
        ("401", UNAUTHORIZED),
        (
            "403",
            "`insufficient_scope`: the token lacks the scope orders:ship",
        ),
        ("404", "no such order"),
        ("409", "the state machine forbids this transition"),
        ("503", UNAVAILABLE),
    ]);
    ship_responses["200"] = order.clone();
    let mut cancel_responses = errors(&[
        ("400", "invalid order id or body"),
        ("401", UNAUTHORIZED),
        ("404", "no such order, or another customer's"),
        ("409", "the state machine forbids this transition"),
        ("503", UNAVAILABLE),
    ]);
    cancel_responses["200"] = order.clone();
    let mut get_responses = errors(&[
        ("400", "invalid order id"),
        ("401", UNAUTHORIZED),
        (
            "404",
            "not in the read model (yet), or another customer's order",
        ),
        ("503", UNAVAILABLE),
    ]);
    get_responses["200"] = order;
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "orders (herald reference service)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "With --auth jwt (the default on real services) the order routes need `Authorization: Bearer <JWT>`: `sub` is the customer id, who places, reads, lists and cancels its own orders; shipping needs the scope orders:ship (any customer's order); orders:admin acts for every customer."
        },
        "paths": {
            "/orders": {
                "post": {
                    "summary": "Place an order (write model + outbox, one transaction)",
                    "security": secured.clone(),
                    "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "maxLength": 200 } }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreateOrder" } } } },
                    "responses": create_responses
                },
                "get": {
                    "summary": "A customer's orders, from the read model",
                    "security": secured.clone(),
                    "parameters": [
                        { "name": "customer_id", "in": "query", "required": false, "description": "the customer; with a token it defaults to the caller and may not be another customer (403); without authentication it is required", "schema": { "type": "string", "format": "uuid" } },
                        { "name": "limit", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }
                    ],
                    "responses": {
                        "200": { "description": "the orders", "content": { "application/json": { "schema": { "type": "object", "properties": { "orders": { "type": "array", "items": { "$ref": "#/components/schemas/Order" } } } } } } },
                        "400": error_response("missing or invalid parameter"),
                        "401": error_response(UNAUTHORIZED),
                        "403": error_response("`forbidden`: customer_id is another customer"),
                        "503": error_response(UNAVAILABLE)
                    }
                }
            },
            "/orders/{id}": { "get": { "summary": "One order, from the read model (eventually consistent)", "security": secured.clone(), "parameters": [id_param.clone()], "responses": get_responses } },
            "/orders/{id}/ship": { "post": { "summary": "Ship an order (created → shipped); needs the scope orders:ship", "security": [{ "bearerAuth": ["orders:ship"] }], "parameters": [id_param.clone()], "responses": ship_responses } },
            "/orders/{id}/cancel": {
                "post": {
                    "summary": "Cancel an order (created → cancelled)",
                    "security": secured,
                    "parameters": [id_param],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CancelOrder" } } } },
                    "responses": cancel_responses
                }
            },
            "/healthz": { "get": { "summary": "The process is alive", "responses": { "200": { "description": "alive" } } } },
            "/readyz": { "get": { "summary": "Database and Kafka are reachable", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text exposition format" } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } }
        },
        "components": {
        "securitySchemes": {
            "bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "HS256 (--jwt-secret), or RS256/ES256 (--jwt-public-key); exp required, 30 s leeway; iss/aud checked when configured"
            }
        },
        "schemas": {
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
