//! Every API rule through `oneshot`: validation, the error shape, the state
//! machine, idempotency keys, and the OpenAPI document.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};

use crate::support::*;

#[tokio::test]
async fn a_valid_order_is_created_with_its_total_and_event() {
    let Some(api) = api().await else { return };
    let (status, body) = send(&api.router, post_json("/orders", valid_order().to_string())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["total"], "25.99");
    assert_eq!(body["status"], "created");
    assert_eq!(body["version"], 1);
    let events: Vec<(String, String)> =
        sqlx::query_as("SELECT event_type, record_key FROM herald_outbox")
            .fetch_all(&api.pool)
            .await
            .expect("outbox");
    assert_eq!(
        events,
        [(
            "OrderCreated".to_owned(),
            body["id"].as_str().expect("id").to_owned()
        )]
    );
}

#[tokio::test]
async fn malformed_requests_get_4xx_in_one_shape() {
    let Some(api) = api().await else { return };
    let mut order = valid_order();
    let customer = order["customer_id"].clone();
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        ("malformed JSON", post_json("/orders", "{\"customer_id\": "), StatusCode::BAD_REQUEST, "malformed_json"),
        ("trailing garbage", post_json("/orders", format!("{} x", valid_order())), StatusCode::BAD_REQUEST, "malformed_json"),
        (
            "wrong content type",
            Request::post("/orders").header("content-type", "text/plain").body(Body::from(valid_order().to_string())).expect("req"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "no content type",
            Request::post("/orders").body(Body::from(valid_order().to_string())).expect("req"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("oversized body", post_json("/orders", format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000))), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("invalid UTF-8", post_json("/orders", b"{\"customer_id\": \"\xff\xfe\"}".to_vec()), StatusCode::BAD_REQUEST, "invalid_utf8"),
        ("unknown field", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [], "coupon": "X"}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (
            "duplicate key",
            post_json("/orders", format!("{{\"customer_id\": \"{}\", \"currency\": \"EUR\", \"currency\": \"USD\", \"items\": []}}", customer.as_str().expect("id"))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        ("money as a float", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": 12.5}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        ("quantity out of range", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A", "quantity": 5_000_000_000u64, "unit_price": "1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        ("negative quantity", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A", "quantity": -1, "unit_price": "1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        ("NUL in a string", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A\u{0}B", "quantity": 1, "unit_price": "1"}]}).to_string()), StatusCode::BAD_REQUEST, "invalid_character"),
        ("empty items", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": []}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("too many items", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": vec![json!({"sku": "A", "quantity": 1, "unit_price": "1"}); 101]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("over-long sku", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A".repeat(65), "quantity": 1, "unit_price": "1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("too many decimals", post_json("/orders", json!({"customer_id": customer, "currency": "JPY", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.5"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("negative price", post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": "-1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("unknown currency", post_json("/orders", json!({"customer_id": customer, "currency": "XXX", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("bad customer id", post_json("/orders", json!({"customer_id": "x".repeat(1000), "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}).to_string()), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("over-long order id", post_json(&format!("/orders/{}/ship", "9".repeat(400)), ""), StatusCode::BAD_REQUEST, "invalid_order_id"),
        ("bad order id", Request::get("/orders/not-a-uuid").body(Body::empty()).expect("req"), StatusCode::BAD_REQUEST, "invalid_order_id"),
        ("unknown route", Request::get("/nope").body(Body::empty()).expect("req"), StatusCode::NOT_FOUND, "route_not_found"),
        ("wrong method", Request::delete("/orders").body(Body::empty()).expect("req"), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("missing customer_id", Request::get("/orders").body(Body::empty()).expect("req"), StatusCode::BAD_REQUEST, "invalid_customer_id"),
        ("unknown parameter", Request::get(format!("/orders?customer_id={}&x=1", customer.as_str().expect("id"))).body(Body::empty()).expect("req"), StatusCode::BAD_REQUEST, "unknown_parameter"),
        ("bad idempotency key", Request::post("/orders").header("content-type", "application/json").header("idempotency-key", "k".repeat(300)).body(Body::from(valid_order().to_string())).expect("req"), StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
    ];
    for (name, request, expected, code) in cases {
        let (status, body) = send(&api.router, request).await;
        assert_eq!(status, expected, "{name}: {body}");
        assert_error(status, &body, expected, code);
    }
    // Field details point at the field.
    order["items"][0]["quantity"] = json!(0);
    order["items"][1]["unit_price"] = json!("1.999");
    let (status, body) = send(&api.router, post_json("/orders", order.to_string())).await;
    let error = assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let fields: Vec<&str> = error["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| d["field"].as_str().expect("field"))
        .collect();
    assert_eq!(fields, ["items[0].quantity", "items[1].unit_price"]);
    let (_, body) = send(&api.router, post_json("/orders", json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price": 1.5}]}).to_string())).await;
    assert_eq!(
        body["error"]["details"][0]["field"], "items[0].unit_price",
        "{body}"
    );
    // Nothing was written by any rejected request.
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&api.pool)
        .await
        .expect("count");
    assert_eq!(count, 0);
}

#[tokio::test]
async fn the_state_machine_allows_ship_or_cancel_once() {
    let Some(api) = api().await else { return };
    let (_, created) = send(&api.router, post_json("/orders", valid_order().to_string())).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, other) = send(&api.router, post_json("/orders", valid_order().to_string())).await;
    let other = other["id"].as_str().expect("id").to_owned();

    let (status, body) = send(&api.router, post_json(&format!("/orders/{id}/ship"), "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].clone(), body["version"].clone()),
        (json!("shipped"), json!(2))
    );
    let (status, body) = send(
        &api.router,
        post_json(
            &format!("/orders/{id}/cancel"),
            json!({"reason": "too late"}).to_string(),
        ),
    )
    .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");
    let (status, body) = send(&api.router, post_json(&format!("/orders/{id}/ship"), "")).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");

    let (status, body) = send(
        &api.router,
        post_json(
            &format!("/orders/{other}/cancel"),
            json!({"reason": ""}).to_string(),
        ),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let (status, body) = send(
        &api.router,
        post_json(
            &format!("/orders/{other}/cancel"),
            json!({"reason": "changed my mind"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancel_reason"], "changed my mind");
    let (status, body) = send(&api.router, post_json(&format!("/orders/{other}/ship"), "")).await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");

    let unknown = uuid::Uuid::new_v4();
    let (status, body) = send(
        &api.router,
        post_json(&format!("/orders/{unknown}/ship"), ""),
    )
    .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "order_not_found");

    let events: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM herald_outbox ORDER BY id")
            .fetch_all(&api.pool)
            .await
            .expect("outbox");
    assert_eq!(
        events,
        [
            "OrderCreated",
            "OrderCreated",
            "OrderShipped",
            "OrderCancelled"
        ],
        "one event per transition, none for refusals"
    );
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer() {
    let Some(api) = api().await else { return };
    let order = valid_order();
    let request = |body: &Value| {
        Request::post("/orders")
            .header("content-type", "application/json")
            .header("idempotency-key", "retry-me-1")
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    let (first_status, first) = send(&api.router, request(&order)).await;
    assert_eq!(first_status, StatusCode::CREATED);
    let (again_status, again) = send(&api.router, request(&order)).await;
    assert_eq!(again_status, StatusCode::CREATED);
    assert_eq!(again, first, "the same answer");
    let mut different = order.clone();
    different["currency"] = json!("USD");
    let (status, body) = send(&api.router, request(&different)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );

    // Concurrent retries with one key create one order.
    let mut tasks = Vec::new();
    let concurrent = valid_order();
    for _ in 0..8 {
        let router = api.router.clone();
        let body = concurrent.to_string();
        tasks.push(tokio::spawn(async move {
            send(
                &router,
                Request::post("/orders")
                    .header("content-type", "application/json")
                    .header("idempotency-key", "concurrent-1")
                    .body(Body::from(body))
                    .expect("request"),
            )
            .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&api.pool)
        .await
        .expect("count");
    assert_eq!(count, 2, "one order per key");
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let Some(api) = api().await else { return };
    let (status, spec) = send(
        &api.router,
        Request::get("/openapi.json")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let paths = spec["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut expected: Vec<(String, String)> = orders::api::openapi::OPERATIONS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    expected.sort();
    assert_eq!(documented, expected);
    // Every documented operation is routed (never 404 route_not_found or 405).
    for (method, path) in &expected {
        let uri = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let request = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .expect("req");
        let (status, body) = send(&api.router, request).await;
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && body["error"]["code"] != "route_not_found",
            "{method} {path}: {status} {body}"
        );
    }
}

#[tokio::test]
async fn health_is_up_and_metrics_are_prometheus_text() {
    let Some(api) = api().await else { return };
    let (status, body) = send(
        &api.router,
        Request::get("/healthz").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let (status, body) = send(
        &api.router,
        Request::get("/readyz").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["database"], true);
    let response = tower::ServiceExt::oneshot(
        api.router.clone(),
        Request::get("/metrics").body(Body::empty()).expect("req"),
    )
    .await
    .expect("response");
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec(),
    )
    .expect("utf-8");
    assert!(
        text.contains("# TYPE herald_outbox_backlog gauge"),
        "{text}"
    );
    assert!(text.contains("orders_post_commit_seconds_count"), "{text}");
}
