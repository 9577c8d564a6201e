//! Bearer-JWT authentication and per-customer authorization of the order
//! routes (issue 17), through `oneshot` on a fresh database: the token
//! matrix (missing, malformed, expired, wrong key, wrong algorithm, `alg:
//! none`), who may do what, RS256 and ES256 keys made with `openssl`, the
//! open operations routes, `--metrics-addr` on an API process, and the
//! start-up rules.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orders::api::auth::{AuthConfig, AuthMode, KeySource, TokenSigner, SCOPE_ADMIN, SCOPE_SHIP};
use orders::app::{Application, Components};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

use crate::support::*;

/// The HS256 secret of these tests (at least 32 bytes).
const SECRET: &str = "the-auth-tests-hs256-secret-of-32-bytes-or-more";

fn signer() -> TokenSigner {
    TokenSigner::hs256(SECRET.as_bytes()).expect("signer")
}

fn token(customer: Uuid, scopes: &[&str]) -> String {
    signer()
        .mint(customer, scopes, Duration::from_secs(300))
        .expect("token")
}

/// An API verifying HS256 tokens signed with [`SECRET`].
async fn hs256_api() -> Option<Api> {
    api_with(AuthConfig::hs256(SECRET).build().expect("auth")).await
}

/// A request with an optional bearer token and JSON body.
fn request(method: &str, uri: &str, token: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => builder.body(Body::empty()),
    }
    .expect("request")
}

/// Status, headers and JSON body (and the raw text, to look for leaks).
async fn exchange(
    router: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, HeaderMap, Value, String) {
    let response = router.clone().oneshot(request).await.expect("response");
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    )
}

fn challenge(headers: &HeaderMap) -> String {
    headers
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().expect("ascii").to_owned())
        .unwrap_or_default()
}

/// Sends `request`, asserts the error shape with `status` and `code`, and
/// returns the `WWW-Authenticate` challenge (empty when there is none).
async fn assert_rejected(
    router: &axum::Router,
    request: Request<Body>,
    status: StatusCode,
    code: &str,
) -> String {
    let (answered, headers, body, _) = exchange(router, request).await;
    assert_error(answered, &body, status, code);
    challenge(&headers)
}

/// Asserts a 401 with `code` and, for a presented token, RFC 6750's
/// `invalid_token` challenge; the answer never echoes the token.
async fn assert_unauthorized(router: &axum::Router, case: &str, raw: Option<&str>, code: &str) {
    let mut builder = Request::get("/orders");
    if let Some(raw) = raw {
        builder = builder.header(header::AUTHORIZATION, raw);
    }
    let (status, headers, body, text) =
        exchange(router, builder.body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
    assert_error(status, &body, StatusCode::UNAUTHORIZED, code);
    let challenge = challenge(&headers);
    if code == "unauthorized" {
        assert_eq!(challenge, "Bearer realm=\"orders\"", "{case}");
    } else {
        assert!(
            challenge.starts_with(
                "Bearer realm=\"orders\", error=\"invalid_token\", error_description=\""
            ),
            "{case}: {challenge}"
        );
    }
    if let Some(token) = raw.and_then(|r| r.strip_prefix("Bearer ")) {
        if token.len() > 8 {
            assert!(!text.contains(token), "{case}: the answer echoes the token");
            assert!(
                !challenge.contains(token),
                "{case}: the challenge echoes the token"
            );
        }
    }
    assert!(
        !text.contains(SECRET) && !challenge.contains(SECRET),
        "{case}"
    );
}

/// base64url without padding (RFC 7515's encoding of JWT parts).
fn b64(value: &Value) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = value.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// A token of `claims`, signed HS256 with `secret`.
fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("token")
}

/// RSA and P-256 key pairs made with the `openssl` command line.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let dir = std::env::temp_dir().join(herald_test::unique_name("orders-auth-keys"));
        std::fs::create_dir_all(&dir).expect("key dir");
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("the openssl command line");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ]);
        openssl(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"]);
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ]);
        openssl(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"]);
        Keys { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("key file")
    }

    fn signer(&self, private: &str) -> TokenSigner {
        TokenSigner::from_private_key_pem(&self.read(private)).expect("signer")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An API verifying with the public key file `public` (RS256 or ES256 by
/// its type).
async fn public_key_api(keys: &Keys, public: &str) -> Option<Api> {
    let config = AuthConfig {
        mode: AuthMode::Jwt,
        key: Some(KeySource::PublicKeyFile(keys.path(public))),
        issuer: None,
        audience: None,
    };
    api_with(config.build().expect("auth")).await
}

/// Puts the API's orders in the read model (no projection runs here).
async fn project_all(pool: &sqlx::PgPool) {
    sqlx::query(
        "INSERT INTO order_views (order_id, customer_id, currency, total, items, status, version,
                                  last_event_id, last_event_type, created_at, updated_at)
         SELECT id, customer_id, currency, total, items, status, version, $1, 'OrderCreated',
                created_at, updated_at
         FROM orders ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .execute(pool)
    .await
    .expect("project");
}

fn order_of(customer: Uuid) -> Value {
    let mut order = valid_order();
    order["customer_id"] = json!(customer);
    order
}

/// Places an order for `customer` with its own token; returns its id.
async fn place(router: &axum::Router, customer: Uuid) -> String {
    let (status, _, body, _) = exchange(
        router,
        request(
            "POST",
            "/orders",
            Some(&token(customer, &[])),
            Some(order_of(customer)),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn missing_malformed_expired_and_wrongly_signed_tokens_are_401() {
    let Some(api) = hs256_api().await else { return };
    let router = &api.router;
    let me = Uuid::new_v4();
    let claims = |extra: Value| {
        let mut claims = json!({ "sub": me.to_string(), "exp": now() + 300 });
        for (k, v) in extra.as_object().expect("object") {
            claims[k] = v.clone();
        }
        claims
    };
    assert_unauthorized(router, "no token", None, "unauthorized").await;
    assert_unauthorized(
        router,
        "another scheme",
        Some("Basic dXNlcjpwYXNz"),
        "unauthorized",
    )
    .await;
    assert_unauthorized(router, "empty bearer", Some("Bearer "), "invalid_token").await;
    assert_unauthorized(
        router,
        "not a JWT",
        Some("Bearer not-a-jwt"),
        "invalid_token",
    )
    .await;
    assert_unauthorized(
        router,
        "garbage parts",
        Some("Bearer abc.def.ghi"),
        "invalid_token",
    )
    .await;
    let expired = hs256(&claims(json!({ "exp": now() - 120 })), SECRET.as_bytes());
    assert_unauthorized(
        router,
        "expired",
        Some(&format!("Bearer {expired}")),
        "token_expired",
    )
    .await;
    let early = hs256(&claims(json!({ "nbf": now() + 600 })), SECRET.as_bytes());
    assert_unauthorized(
        router,
        "not yet valid",
        Some(&format!("Bearer {early}")),
        "invalid_token",
    )
    .await;
    let no_exp = hs256(&json!({ "sub": me.to_string() }), SECRET.as_bytes());
    assert_unauthorized(
        router,
        "no exp",
        Some(&format!("Bearer {no_exp}")),
        "invalid_token",
    )
    .await;
    let wrong_key = hs256(
        &claims(json!({})),
        b"another-secret-that-is-also-32-bytes-long",
    );
    assert_unauthorized(
        router,
        "wrong key",
        Some(&format!("Bearer {wrong_key}")),
        "invalid_token",
    )
    .await;
    let tampered = {
        let [head, _, signature]: [&str; 3] = wrong_key
            .split('.')
            .collect::<Vec<_>>()
            .try_into()
            .expect("three parts");
        let other = b64(&claims(json!({ "sub": Uuid::new_v4().to_string() })));
        format!("{head}.{other}.{signature}")
    };
    assert_unauthorized(
        router,
        "tampered",
        Some(&format!("Bearer {tampered}")),
        "invalid_token",
    )
    .await;
    let not_a_uuid = hs256(&claims(json!({ "sub": "alice" })), SECRET.as_bytes());
    assert_unauthorized(
        router,
        "sub not a UUID",
        Some(&format!("Bearer {not_a_uuid}")),
        "invalid_token",
    )
    .await;
    // `alg: none`, unsigned, with and without the trailing dot.
    let body = b64(&claims(json!({})));
    for header in [
        json!({ "alg": "none", "typ": "JWT" }),
        json!({ "alg": "None" }),
    ] {
        let unsigned = format!("{}.{body}.", b64(&header));
        assert_unauthorized(
            router,
            "alg none",
            Some(&format!("Bearer {unsigned}")),
            "invalid_token",
        )
        .await;
        let unsigned = format!("{}.{body}", b64(&header));
        assert_unauthorized(
            router,
            "alg none, two parts",
            Some(&format!("Bearer {unsigned}")),
            "invalid_token",
        )
        .await;
    }
    // An RS256 token to an HS256 server.
    let keys = Keys::new();
    let rs256 = keys
        .signer("rsa.pem")
        .mint(me, &[], Duration::from_secs(300))
        .expect("token");
    assert_unauthorized(
        router,
        "RS256 to HS256",
        Some(&format!("Bearer {rs256}")),
        "invalid_token",
    )
    .await;
    let es256 = keys
        .signer("ec.pem")
        .mint(me, &[], Duration::from_secs(300))
        .expect("token");
    assert_unauthorized(
        router,
        "ES256 to HS256",
        Some(&format!("Bearer {es256}")),
        "invalid_token",
    )
    .await;
    // A valid one passes (the list is empty: nothing is projected).
    let (status, _, body, _) = exchange(
        router,
        request("GET", "/orders", Some(&token(me, &[])), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["orders"], json!([]));
}

#[tokio::test]
async fn operations_routes_stay_open_and_unknown_routes_are_404() {
    let Some(api) = hs256_api().await else { return };
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let (status, _, body, _) = exchange(&api.router, request("GET", path, None, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    assert_rejected(
        &api.router,
        request("GET", "/nope", None, None),
        StatusCode::NOT_FOUND,
        "route_not_found",
    )
    .await;
    // Every order route needs the token.
    let id = Uuid::new_v4();
    for (method, path) in [
        ("POST", "/orders".to_owned()),
        ("GET", "/orders".to_owned()),
        ("GET", format!("/orders/{id}")),
        ("POST", format!("/orders/{id}/ship")),
        ("POST", format!("/orders/{id}/cancel")),
    ] {
        let challenge = assert_rejected(
            &api.router,
            request(method, &path, None, Some(json!({}))),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .await;
        assert_eq!(challenge, "Bearer realm=\"orders\"", "{method} {path}");
    }
}

#[tokio::test]
async fn customers_place_read_list_and_cancel_their_own_orders_only() {
    let Some(api) = hs256_api().await else { return };
    let router = &api.router;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (alice_token, bob_token) = (token(alice, &[]), token(bob, &[]));

    // Bob cannot place an order for Alice.
    let challenge = assert_rejected(
        router,
        request("POST", "/orders", Some(&bob_token), Some(order_of(alice))),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert!(challenge.is_empty(), "not a scope matter");
    let id = place(router, alice).await;
    project_all(&api.pool).await;

    // Alice reads hers; Bob's read is a 404 like a missing order's.
    let (status, _, body, _) = exchange(
        router,
        request("GET", &format!("/orders/{id}"), Some(&alice_token), None),
    )
    .await;
    assert_eq!(
        (status, body["customer_id"].clone()),
        (StatusCode::OK, json!(alice)),
        "{body}"
    );
    let (status, _, other, _) = exchange(
        router,
        request("GET", &format!("/orders/{id}"), Some(&bob_token), None),
    )
    .await;
    assert_error(status, &other, StatusCode::NOT_FOUND, "order_not_found");
    let missing = Uuid::new_v4();
    let (_, _, absent, _) = exchange(
        router,
        request("GET", &format!("/orders/{missing}"), Some(&bob_token), None),
    )
    .await;
    assert_eq!(other, absent, "another's order answers as a missing one");

    // Lists: one's own by default or by name; another's is 403.
    let (status, _, body, _) =
        exchange(router, request("GET", "/orders", Some(&alice_token), None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["orders"].as_array().map(Vec::len), Some(1), "{body}");
    let (status, _, body, _) = exchange(
        router,
        request(
            "GET",
            &format!("/orders?customer_id={alice}"),
            Some(&alice_token),
            None,
        ),
    )
    .await;
    assert_eq!(
        (status, body["orders"][0]["id"].clone()),
        (StatusCode::OK, json!(id)),
        "{body}"
    );
    let (status, _, body, _) =
        exchange(router, request("GET", "/orders", Some(&bob_token), None)).await;
    assert_eq!(
        (status, body["orders"].clone()),
        (StatusCode::OK, json!([])),
        "{body}"
    );
    assert_rejected(
        router,
        request(
            "GET",
            &format!("/orders?customer_id={alice}"),
            Some(&bob_token),
            None,
        ),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;

    // Bob cannot cancel it (404, and it stays created); Alice can.
    let reason = json!({ "reason": "changed my mind" });
    let cancel = format!("/orders/{id}/cancel");
    assert_rejected(
        router,
        request("POST", &cancel, Some(&bob_token), Some(reason.clone())),
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    let status_now: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(Uuid::parse_str(&id).expect("uuid"))
        .fetch_one(&api.pool)
        .await
        .expect("status");
    assert_eq!(status_now, "created");
    // A shipper's scope does not let it cancel (or read) others' orders.
    let shipper = token(bob, &[SCOPE_SHIP]);
    assert_rejected(
        router,
        request("POST", &cancel, Some(&shipper), Some(reason.clone())),
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    assert_rejected(
        router,
        request("GET", &format!("/orders/{id}"), Some(&shipper), None),
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    let (status, _, body, _) = exchange(
        router,
        request("POST", &cancel, Some(&alice_token), Some(reason)),
    )
    .await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("cancelled")),
        "{body}"
    );
}

#[tokio::test]
async fn shipping_needs_the_ship_scope_and_ships_any_customers_order() {
    let Some(api) = hs256_api().await else { return };
    let router = &api.router;
    let (alice, clerk) = (Uuid::new_v4(), Uuid::new_v4());
    let id = place(router, alice).await;
    let ship = format!("/orders/{id}/ship");
    // Not even the owner ships without the scope.
    for who in [token(alice, &[]), token(clerk, &["orders:read"])] {
        let challenge = assert_rejected(
            router,
            request("POST", &ship, Some(&who), None),
            StatusCode::FORBIDDEN,
            "insufficient_scope",
        )
        .await;
        assert!(
            challenge.starts_with(
                "Bearer realm=\"orders\", error=\"insufficient_scope\", scope=\"orders:ship\""
            ),
            "{challenge}"
        );
    }
    // A back-office clerk with the scope ships Alice's order (`scp` array
    // form here).
    let clerk_token = hs256(
        &json!({ "sub": clerk.to_string(), "exp": now() + 300, "scp": [SCOPE_SHIP] }),
        SECRET.as_bytes(),
    );
    let (status, _, body, _) =
        exchange(router, request("POST", &ship, Some(&clerk_token), None)).await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("shipped")),
        "{body}"
    );
    // Shipping a missing order is still 404.
    assert_rejected(
        router,
        request(
            "POST",
            &format!("/orders/{}/ship", Uuid::new_v4()),
            Some(&clerk_token),
            None,
        ),
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
}

#[tokio::test]
async fn an_admin_acts_for_every_customer() {
    let Some(api) = hs256_api().await else { return };
    let router = &api.router;
    let (alice, admin) = (Uuid::new_v4(), Uuid::new_v4());
    let admin_token = token(admin, &[SCOPE_ADMIN]);
    let (status, _, body, _) = exchange(
        router,
        request("POST", "/orders", Some(&admin_token), Some(order_of(alice))),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    project_all(&api.pool).await;
    let (status, _, body, _) = exchange(
        router,
        request("GET", &format!("/orders/{id}"), Some(&admin_token), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body, _) = exchange(
        router,
        request(
            "GET",
            &format!("/orders?customer_id={alice}"),
            Some(&admin_token),
            None,
        ),
    )
    .await;
    assert_eq!(
        body["orders"].as_array().map(Vec::len),
        Some(1),
        "{status} {body}"
    );
    // Shipping still needs its own scope.
    assert_rejected(
        router,
        request(
            "POST",
            &format!("/orders/{id}/ship"),
            Some(&admin_token),
            None,
        ),
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    )
    .await;
    let (status, _, body, _) = exchange(
        router,
        request(
            "POST",
            &format!("/orders/{id}/cancel"),
            Some(&admin_token),
            Some(json!({ "reason": "support" })),
        ),
    )
    .await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("cancelled")),
        "{body}"
    );
}

#[tokio::test]
async fn rs256_and_es256_servers_accept_their_keys_tokens_only() {
    let keys = Keys::new();
    let me = Uuid::new_v4();
    let ttl = Duration::from_secs(300);
    for (public, private, other_private) in [
        ("rsa.pub.pem", "rsa.pem", "ec.pem"),
        ("ec.pub.pem", "ec.pem", "rsa.pem"),
    ] {
        let Some(api) = public_key_api(&keys, public).await else {
            return;
        };
        let router = &api.router;
        let signer = keys.signer(private);
        // The happy path: place, ship with the scope.
        let own = signer.mint(me, &[SCOPE_SHIP], ttl).expect("token");
        let (status, _, body, _) = exchange(
            router,
            request("POST", "/orders", Some(&own), Some(order_of(me))),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{public}: {body}");
        let id = body["id"].as_str().expect("id").to_owned();
        let (status, _, body, _) = exchange(
            router,
            request("POST", &format!("/orders/{id}/ship"), Some(&own), None),
        )
        .await;
        assert_eq!(
            (status, body["status"].clone()),
            (StatusCode::OK, json!("shipped")),
            "{public}: {body}"
        );

        let header = format!("{public}: other key type");
        let other = keys
            .signer(other_private)
            .mint(me, &[], ttl)
            .expect("token");
        assert_unauthorized(
            router,
            &header,
            Some(&format!("Bearer {other}")),
            "invalid_token",
        )
        .await;
        // The classic confusion: HS256 "signed" with the public key's PEM.
        let confused = hs256(
            &json!({ "sub": me.to_string(), "exp": now() + 300 }),
            &keys.read(public),
        );
        let case = format!("{public}: HS256 with the public key as secret");
        assert_unauthorized(
            router,
            &case,
            Some(&format!("Bearer {confused}")),
            "invalid_token",
        )
        .await;
        let hs = token(me, &[]);
        assert_unauthorized(
            router,
            &format!("{public}: HS256"),
            Some(&format!("Bearer {hs}")),
            "invalid_token",
        )
        .await;
        let unsigned = format!(
            "{}.{}.",
            b64(&json!({ "alg": "none" })),
            b64(&json!({ "sub": me.to_string(), "exp": now() + 300 }))
        );
        assert_unauthorized(
            router,
            &format!("{public}: alg none"),
            Some(&format!("Bearer {unsigned}")),
            "invalid_token",
        )
        .await;
        // Expired, of the right key.
        let expired = jsonwebtoken::encode(
            &Header::new(signer.algorithm()),
            &json!({ "sub": me.to_string(), "exp": now() - 120 }),
            &match signer.algorithm() {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&keys.read(private)).expect("key"),
                _ => EncodingKey::from_ec_pem(&keys.read(private)).expect("key"),
            },
        )
        .expect("token");
        assert_unauthorized(
            router,
            &format!("{public}: expired"),
            Some(&format!("Bearer {expired}")),
            "token_expired",
        )
        .await;
    }
}

#[test]
fn wrong_key_files_fail_with_the_setting_named() {
    let keys = Keys::new();
    let config = |key: KeySource| AuthConfig {
        mode: AuthMode::Jwt,
        key: Some(key),
        issuer: None,
        audience: None,
    };
    for (source, expected) in [
        (
            KeySource::PublicKeyFile(keys.path("rsa.pem")),
            "private key",
        ),
        (
            KeySource::PublicKeyFile(keys.path("missing.pem")),
            "missing.pem",
        ),
        (KeySource::Secret("short".into()), "at least 32 bytes"),
    ] {
        let error = format!("{:#}", config(source).build().expect_err("refused"));
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("--jwt-"), "names the setting: {error}");
    }
    assert!(Path::new(&keys.path("ec.pub.pem")).exists());
}

#[tokio::test]
async fn the_config_debug_output_hides_the_secret() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let mut config = config_without_kafka(&db, "127.0.0.1:9");
    config.auth = AuthConfig::hs256(SECRET);
    let shown = format!("{config:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

/// With auth jwt on real services and no key, the API does not start, and
/// says which setting is missing; a process without the API needs none.
#[tokio::test]
async fn without_a_key_the_api_does_not_start_and_names_the_setting() {
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let mut config = config_without_kafka(&db, "127.0.0.1:9");
    config.auth = AuthConfig {
        key: None,
        ..AuthConfig::hs256(SECRET)
    };
    let error = Application::build(config, Components::ALL)
        .await
        .err()
        .expect("no key, no start");
    let error = format!("{error:#}");
    assert!(
        error.contains("--jwt-secret")
            && error.contains("--jwt-public-key")
            && error.contains("--auth none"),
        "{error}"
    );

    // The binary: `orders run` on real services with no auth settings.
    let binary = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_orders"));
        command
            .args(args)
            .env("KAFKA_BROKERS", "127.0.0.1:9")
            .env("DATABASE_URL", db.url())
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "off");
        for key in ["ORDERS_AUTH", "ORDERS_JWT_SECRET", "ORDERS_JWT_PUBLIC_KEY"] {
            command.env_remove(key);
        }
        command.output().expect("orders")
    };
    for subcommand in ["run", "api"] {
        let output = binary(&[subcommand]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "orders {subcommand} started without a key"
        );
        assert!(
            stderr.contains("--jwt-secret"),
            "orders {subcommand}: {stderr}"
        );
    }
    // `migrate` (like relay, worker, processor, dlq) needs no key.
    let output = binary(&["migrate"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `--metrics-addr` moves an API process's /metrics off its public port;
/// over real sockets, with a token the API answers.
#[tokio::test]
async fn an_api_given_metrics_addr_serves_metrics_there_only() {
    async fn get(client: &reqwest::Client, url: String) -> reqwest::Response {
        client.get(url).send().await.expect("get")
    }
    let Some(postgres) = herald_test::postgres() else {
        return;
    };
    let db = postgres.database().await;
    let mut config = config_without_kafka(&db, "127.0.0.1:9");
    config.auth = AuthConfig::hs256(SECRET);
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let app = Application::build(
        config,
        Components {
            api: true,
            ..Components::NONE
        },
    )
    .await
    .expect("build");
    let public = format!("http://127.0.0.1:{}", app.port());
    let ops = format!(
        "http://127.0.0.1:{}",
        app.metrics_port().expect("metrics port")
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();

    let response = get(&client, format!("{public}/metrics")).await;
    assert_eq!(response.status(), 404, "no /metrics on the public port");
    let response = get(&client, format!("{ops}/metrics")).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    assert!(
        text.contains("# TYPE herald_outbox_backlog gauge"),
        "{text}"
    );
    for base in [&public, &ops] {
        let response = get(&client, format!("{base}/healthz")).await;
        assert_eq!(response.status(), 200, "{base}/healthz");
    }
    let response = get(&client, format!("{ops}/orders")).await;
    assert_eq!(
        response.status(),
        404,
        "no order routes on the metrics port"
    );

    let me = Uuid::new_v4();
    let response = client
        .post(format!("{public}/orders"))
        .json(&order_of(me))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 401);
    let response = client
        .post(format!("{public}/orders"))
        .bearer_auth(token(me, &[]))
        .json(&order_of(me))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    // The request is counted on the metrics port.
    let text = get(&client, format!("{ops}/metrics"))
        .await
        .text()
        .await
        .expect("text");
    assert!(text.contains("orders_post_commit_seconds_count"), "{text}");

    stop.cancel();
    task.await.expect("task").expect("ran");
}

#[tokio::test]
async fn the_openapi_document_describes_the_bearer_scheme() {
    let Some(api) = hs256_api().await else { return };
    let (status, _, spec, _) =
        exchange(&api.router, request("GET", "/openapi.json", None, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        spec["components"]["securitySchemes"]["bearerAuth"],
        json!({
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"].clone()
        })
    );
    for (method, path) in orders::api::openapi::OPERATIONS {
        let operation = &spec["paths"][path][method];
        let secured = path.starts_with("/orders");
        assert_eq!(operation["security"].is_array(), secured, "{method} {path}");
        assert_eq!(
            operation["responses"]["401"].is_object(),
            secured,
            "{method} {path}"
        );
    }
    let ship = &spec["paths"]["/orders/{id}/ship"]["post"];
    assert!(ship["responses"]["403"].is_object());
    assert_eq!(ship["security"], json!([{ "bearerAuth": ["orders:ship"] }]));
}
