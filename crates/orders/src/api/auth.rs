//! Bearer-JWT authentication of the order routes, and who may do what.
//!
//! # Authentication
//! With `--auth jwt` every order route needs `Authorization: Bearer <JWT>`
//! (RFC 6750), verified with one key whose algorithm is pinned by the
//! configuration: a shared secret (`--jwt-secret`) is HS256, a public-key
//! PEM file (`--jwt-public-key`) is RS256 for an RSA key and ES256 for a
//! P-256 key. A token of any other algorithm — `alg: none`, or an HS256
//! token "signed" with the public key's PEM text — is rejected, so the
//! token's header never chooses how it is checked. `exp` is required,
//! `exp` and `nbf` are checked with [`LEEWAY`] of clock skew, and `iss` /
//! `aud` are required and checked when `--jwt-issuer` / `--jwt-audience`
//! are set (and not checked otherwise).
//!
//! `/healthz`, `/readyz`, `/metrics` and `/openapi.json` stay open: probes
//! and scrapers carry no tokens (move `/metrics` off the public port with
//! `--metrics-addr`).
//!
//! # Authorization
//! The token's `sub` is the customer id (a UUID). Its scopes are the
//! space-separated `scope` claim (RFC 8693) and the `scp` array some
//! issuers use instead.
//! - A customer places orders for itself only: a `customer_id` in the body
//!   other than the subject is 403 `forbidden`.
//! - It reads and cancels its own orders only. Another customer's order
//!   answers 404 `order_not_found`, as an order that does not exist does,
//!   so that order ids cannot be probed.
//! - `GET /orders` lists the caller's orders; `customer_id` may be omitted,
//!   and another customer's id is 403 `forbidden` (an explicit refusal
//!   rather than a misleading empty list; it says nothing about that
//!   customer).
//! - Shipping is a back-office action: it needs the scope
//!   [`SCOPE_SHIP`] (else 403 `insufficient_scope`), and a shipper may
//!   ship any customer's order. The scope does not let it read or cancel
//!   other customers' orders.
//! - The scope [`SCOPE_ADMIN`] (support staff) acts for every customer:
//!   it reads, lists, cancels and places orders of any customer (shipping
//!   still needs [`SCOPE_SHIP`]).
//!
//! With `--auth none` there are no callers: every request may act for any
//! customer, as before authentication existed.
//!
//! Tokens and secrets are never logged nor echoed in answers; a rejected
//! token is logged at debug level with the reason only.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::error::{error_response, ApiError};
use super::AppState;

/// The scope that lets a caller ship orders (any customer's).
pub const SCOPE_SHIP: &str = "orders:ship";

/// The scope that lets a caller act for every customer (support staff).
pub const SCOPE_ADMIN: &str = "orders:admin";

/// Clock skew allowed on `exp` and `nbf`: the issuer's clock and ours may
/// differ this much.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// The `realm` of the `WWW-Authenticate` challenges.
pub const REALM: &str = "orders";

/// The shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key of at
/// least the hash's size (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Longer `Authorization` values are rejected unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// `--auth`: whether the order routes need a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// A bearer JWT on every order route.
    Jwt,
    /// No authentication: anyone may act as any customer.
    None,
}

/// Where the verification key of `--auth jwt` comes from.
#[derive(Clone)]
pub enum KeySource {
    /// An HS256 shared secret (`--jwt-secret`).
    Secret(String),
    /// A PEM file of an RSA or P-256 public key (`--jwt-public-key`).
    PublicKeyFile(PathBuf),
    /// The PEM text of an RSA or P-256 public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret([redacted])"),
            KeySource::PublicKeyFile(path) => f.debug_tuple("PublicKeyFile").field(path).finish(),
            KeySource::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

/// The authentication settings of a process, as configured. They are
/// checked by [`AuthConfig::build`] when the process serves the order
/// routes, so processes without the API need no key.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Whether the order routes need a token.
    pub mode: AuthMode,
    /// The verification key (`--auth jwt` needs one).
    pub key: Option<KeySource>,
    /// The required `iss`, if any.
    pub issuer: Option<String>,
    /// The required `aud` (one of the token's), if any.
    pub audience: Option<String>,
}

impl AuthConfig {
    /// No authentication.
    pub fn none() -> Self {
        Self {
            mode: AuthMode::None,
            key: None,
            issuer: None,
            audience: None,
        }
    }

    /// HS256 tokens signed with `secret`.
    pub fn hs256(secret: impl Into<String>) -> Self {
        Self {
            mode: AuthMode::Jwt,
            key: Some(KeySource::Secret(secret.into())),
            issuer: None,
            audience: None,
        }
    }

    /// The settings of the command line. The default mode is `jwt`, except
    /// in the embedded development mode without a key, where it is `none`.
    /// Empty values count as unset; both keys at once is an error (here,
    /// for every subcommand: it is a contradiction, not a missing key).
    pub fn from_args(args: &crate::cli::AuthArgs, embedded: bool) -> anyhow::Result<Self> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        let secret = given(&args.jwt_secret);
        let public_key = args
            .jwt_public_key
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        let key = match (secret, public_key) {
            (Some(_), Some(_)) => bail!(
                "ORDERS_JWT_SECRET (--jwt-secret) and ORDERS_JWT_PUBLIC_KEY (--jwt-public-key) \
                 are both set: set one"
            ),
            (Some(secret), None) => Some(KeySource::Secret(secret)),
            (None, Some(path)) => Some(KeySource::PublicKeyFile(path)),
            (None, None) => None,
        };
        let mode = args.mode.unwrap_or(if embedded && key.is_none() {
            AuthMode::None
        } else {
            AuthMode::Jwt
        });
        Ok(Self {
            mode,
            key,
            issuer: given(&args.jwt_issuer),
            audience: given(&args.jwt_audience),
        })
    }

    /// Loads and checks the key: what the API verifies tokens with. Errors
    /// name the setting.
    pub fn build(&self) -> anyhow::Result<Auth> {
        if self.mode == AuthMode::None {
            return Ok(Auth::None);
        }
        let verifier = match &self.key {
            None => bail!(
                "ORDERS_AUTH (--auth) is jwt, the default on real services, but no key is set: \
                 set ORDERS_JWT_SECRET (--jwt-secret) or ORDERS_JWT_PUBLIC_KEY \
                 (--jwt-public-key), or ORDERS_AUTH=none (--auth none) to serve the API without \
                 authentication"
            ),
            Some(KeySource::Secret(secret)) => {
                Verifier::hs256(secret.as_bytes()).context("ORDERS_JWT_SECRET (--jwt-secret)")?
            }
            Some(KeySource::PublicKeyFile(path)) => read_pem(
                path,
                "ORDERS_JWT_PUBLIC_KEY / --jwt-public-key",
                Verifier::from_public_key_pem,
            )?,
            Some(KeySource::PublicKeyPem(pem)) => Verifier::from_public_key_pem(pem)
                .context("the public key (ORDERS_JWT_PUBLIC_KEY / --jwt-public-key)")?,
        };
        let verifier = match &self.issuer {
            Some(issuer) => verifier.issuer(issuer),
            None => verifier,
        };
        let verifier = match &self.audience {
            Some(audience) => verifier.audience(audience),
            None => verifier,
        };
        Ok(verifier.into())
    }
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An HS256 secret below [`MIN_SECRET_BYTES`].
    #[error("an HS256 secret has at least {MIN_SECRET_BYTES} bytes (this one has {0})")]
    ShortSecret(usize),
    /// Not a PEM public key of a supported kind.
    #[error("not a PEM public key (`-----BEGIN PUBLIC KEY-----`) of an RSA or P-256 key{hint}")]
    NotAPublicKey {
        /// What the text looks like instead.
        hint: &'static str,
    },
    /// Not a PEM private key of a supported kind.
    #[error(
        "not a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`) of an RSA or P-256 key{hint}"
    )]
    NotAPrivateKey {
        /// What the text looks like instead.
        hint: &'static str,
    },
    /// An elliptic curve other than P-256.
    #[error("an EC key of another curve than P-256 (ES256 is the only EC algorithm accepted)")]
    UnsupportedCurve,
    /// The key did not sign a probe token.
    #[error("the key cannot sign: {0}")]
    Unusable(String),
}

/// What the API verifies tokens with.
#[derive(Clone)]
pub enum Auth {
    /// No authentication.
    None,
    /// Bearer JWTs.
    Jwt(Arc<Verifier>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Jwt(verifier) => f.debug_tuple("Jwt").field(verifier).finish(),
        }
    }
}

impl From<Verifier> for Auth {
    fn from(verifier: Verifier) -> Self {
        Auth::Jwt(Arc::new(verifier))
    }
}

impl Auth {
    /// A one-line description for the start-up log (no key material).
    pub fn describe(&self) -> String {
        match self {
            Auth::None => "none".to_owned(),
            Auth::Jwt(verifier) => format!("bearer JWT ({:?})", verifier.algorithm),
        }
    }
}

/// Verifies bearer tokens with one key and one algorithm.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("key", &"[redacted]")
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .finish()
    }
}

impl Verifier {
    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        // One algorithm: the token's header does not choose.
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Checked only when an audience is configured (then required).
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key,
            algorithm,
            validation,
        }
    }

    /// HS256 with a shared secret of at least [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret(secret.len()));
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// RS256 for an RSA public key, ES256 for a P-256 one (PEM: SPKI
    /// `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`).
    pub fn from_public_key_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let label = pem_label(pem);
        if !matches!(label.as_deref(), Some("PUBLIC KEY" | "RSA PUBLIC KEY")) {
            let hint = match label.as_deref() {
                Some(l) if l.contains("PRIVATE KEY") => {
                    ": this is a private key; give its public half (openssl pkey -pubout)"
                }
                Some("CERTIFICATE") => {
                    ": this is a certificate; give its public key (openssl x509 -pubkey -noout)"
                }
                _ => "",
            };
            return Err(KeyError::NotAPublicKey { hint });
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        match DecodingKey::from_ec_pem(pem) {
            // An uncompressed P-256 point: 0x04, x and y of 32 bytes each.
            Ok(key) if key.as_bytes().len() == 65 && key.as_bytes()[0] == 4 => {
                Ok(Self::new(key, Algorithm::ES256))
            }
            Ok(_) => Err(KeyError::UnsupportedCurve),
            Err(_) => Err(KeyError::NotAPublicKey { hint: "" }),
        }
    }

    /// Requires `iss` to be `issuer`.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self.validation
            .required_spec_claims
            .insert("iss".to_owned());
        self
    }

    /// Requires `aud` to be (or contain) `audience`.
    pub fn audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self.validation
            .required_spec_claims
            .insert("aud".to_owned());
        self
    }

    /// The one algorithm accepted.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies `token` and returns its caller.
    pub fn verify(&self, token: &str) -> Result<Caller, Rejection> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|error| rejection_of(error.kind()))?;
        Caller::from_claims(&data.claims)
    }
}

/// The label of the first PEM block (`PUBLIC KEY`, `PRIVATE KEY`, …).
fn pem_label(pem: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")?;
    Some(text[start..start + end].trim().to_owned())
}

/// The answer to a token the verification refused.
fn rejection_of(kind: &ErrorKind) -> Rejection {
    let description = match kind {
        ErrorKind::ExpiredSignature => {
            return Rejection::invalid_token("token_expired", "the token has expired")
        }
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not the one this server accepts",
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted",
        ErrorKind::InvalidAudience => "the token's audience (aud) is not accepted",
        ErrorKind::MissingRequiredClaim(claim) => {
            return Rejection::invalid_token(
                "invalid_token",
                format!("the token lacks the required {claim} claim"),
            )
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            return Rejection::invalid_token(
                "invalid_token",
                format!("the token's {claim} claim is malformed"),
            )
        }
        // A header or body that is not base64url JSON, an unknown `alg`
        // (`none` among them), not three parts.
        _ => "the token is malformed",
    };
    Rejection::invalid_token("invalid_token", description)
}

/// Who is calling: the customer the token's subject names, and its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The customer id (the token's `sub`).
    pub customer: Uuid,
    /// The granted scopes (`scope` and `scp`).
    pub scopes: BTreeSet<String>,
}

impl Caller {
    /// The caller of verified `claims`: `sub` is a hyphenated UUID;
    /// `scope` a space-separated string, `scp` an array of strings (or a
    /// string), both optional.
    pub fn from_claims(claims: &Map<String, Value>) -> Result<Self, Rejection> {
        let customer = claims
            .get("sub")
            .and_then(Value::as_str)
            // Only the canonical form: one customer, one spelling.
            .filter(|s| s.len() == 36)
            .and_then(|s| Uuid::try_parse(s).ok())
            .ok_or_else(|| {
                Rejection::invalid_token(
                    "invalid_token",
                    "the token's subject (sub) is not a customer id (a UUID)",
                )
            })?;
        let malformed = |claim: &str| {
            Rejection::invalid_token(
                "invalid_token",
                format!("the token's {claim} claim is malformed"),
            )
        };
        let mut scopes = BTreeSet::new();
        match claims.get("scope") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
            Some(_) => return Err(malformed("scope")),
        }
        match claims.get("scp") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
            Some(Value::Array(items)) => {
                for item in items {
                    scopes.insert(item.as_str().ok_or_else(|| malformed("scp"))?.to_owned());
                }
            }
            Some(_) => return Err(malformed("scp")),
        }
        Ok(Self { customer, scopes })
    }

    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }
}

/// What a request may do: what the order handlers take (see [`authenticate`]).
#[derive(Debug, Clone)]
pub enum Access {
    /// `--auth none`: anything, for any customer.
    Open,
    /// An authenticated caller.
    Caller(Caller),
}

impl Access {
    /// Whether it may place, read, list and cancel `customer`'s orders.
    pub fn may_act_for(&self, customer: Uuid) -> bool {
        match self {
            Access::Open => true,
            Access::Caller(caller) => caller.customer == customer || caller.has_scope(SCOPE_ADMIN),
        }
    }

    /// The caller's customer id (`None` with `--auth none`).
    pub fn customer(&self) -> Option<Uuid> {
        match self {
            Access::Open => None,
            Access::Caller(caller) => Some(caller.customer),
        }
    }

    /// Whose orders alone it may change: `None` for any (open, or an
    /// admin).
    pub fn owner_filter(&self) -> Option<Uuid> {
        match self {
            Access::Caller(caller) if !caller.has_scope(SCOPE_ADMIN) => Some(caller.customer),
            _ => None,
        }
    }

    /// Ok when it holds `scope` (always with `--auth none`); a 403
    /// `insufficient_scope` otherwise.
    pub fn require_scope(&self, scope: &'static str) -> Result<(), ApiError> {
        match self {
            Access::Caller(caller) if !caller.has_scope(scope) => {
                Err(ApiError::Auth(Rejection::insufficient_scope(scope)))
            }
            _ => Ok(()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Fails closed: an order route without the middleware is a bug,
        // not an open door.
        parts.extensions.get::<Access>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "an order route ran without the authentication middleware"
            ))
        })
    }
}

/// A refused request: a 401 or 403 with its `WWW-Authenticate` challenge
/// (RFC 6750 §3) and the API's error shape.
#[derive(Debug, Clone)]
pub struct Rejection {
    status: StatusCode,
    code: &'static str,
    message: String,
    challenge: String,
}

impl Rejection {
    /// No bearer token: a bare challenge (RFC 6750 §3.1: no error code
    /// when the request has no credentials).
    pub fn missing(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.to_owned(),
            challenge: format!("Bearer realm=\"{REALM}\""),
        }
    }

    /// A token that does not verify: 401 `invalid_token`.
    pub fn invalid_token(code: &'static str, description: impl Into<String>) -> Self {
        let message = description.into();
        Self {
            status: StatusCode::UNAUTHORIZED,
            code,
            challenge: format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                quoted(&message)
            ),
            message,
        }
    }

    /// A valid token without `scope`: 403 `insufficient_scope`.
    pub fn insufficient_scope(scope: &'static str) -> Self {
        let message = format!("this needs the scope {scope}");
        Self {
            status: StatusCode::FORBIDDEN,
            code: "insufficient_scope",
            challenge: format!(
                "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\", error_description=\"{}\"",
                quoted(&message)
            ),
            message,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// `text` fit for a quoted-string: our own messages, but never a quote or
/// a control character.
fn quoted(text: &str) -> String {
    text.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status, self.code, &self.message, &[]);
        if let Ok(value) = HeaderValue::from_str(&self.challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// The bearer token of `Authorization`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Rejection> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Rejection::missing(
            "this route needs an Authorization: Bearer token",
        ));
    };
    if values.next().is_some() {
        return Err(Rejection::invalid_token(
            "invalid_token",
            "more than one Authorization header",
        ));
    }
    if value.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::invalid_token(
            "invalid_token",
            "the token is too long",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| Rejection::invalid_token("invalid_token", "the token is not visible ASCII"))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Rejection::missing(
            "this route needs an Authorization: Bearer token (not another scheme)",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Rejection::invalid_token(
            "invalid_token",
            "the bearer token is empty",
        ));
    }
    Ok(token)
}

/// The order routes' middleware: verifies the bearer token (with `--auth
/// jwt`) and gives the handlers the request's [`Access`]; a missing or
/// invalid token is answered here, before any handler or body reading.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = match &state.auth {
        Auth::None => Access::Open,
        Auth::Jwt(verifier) => {
            match bearer_token(request.headers()).and_then(|token| verifier.verify(token)) {
                Ok(caller) => Access::Caller(caller),
                Err(rejection) => {
                    // The reason only: never the token.
                    tracing::debug!(
                        code = rejection.code,
                        reason = %rejection.message,
                        "request not authenticated"
                    );
                    return rejection.into_response();
                }
            }
        }
    };
    request.extensions_mut().insert(access);
    next.run(request).await
}

/// Signs tokens: `orders token`, and `orders load`'s synthetic customers.
#[derive(Clone)]
pub struct TokenSigner {
    key: EncodingKey,
    algorithm: Algorithm,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("algorithm", &self.algorithm)
            .field("key", &"[redacted]")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl TokenSigner {
    /// HS256 with a shared secret of at least [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret(secret.len()));
        }
        Ok(Self {
            key: EncodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
            issuer: None,
            audience: None,
        })
    }

    /// RS256 for an RSA private key, ES256 for a P-256 one (PKCS#8 PEM,
    /// `PRIVATE KEY`; PKCS#1 `RSA PRIVATE KEY` too).
    pub fn from_private_key_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let label = pem_label(pem);
        let (key, algorithm) = match label.as_deref() {
            Some("PRIVATE KEY" | "RSA PRIVATE KEY") => {
                if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = EncodingKey::from_ec_pem(pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(KeyError::NotAPrivateKey { hint: "" });
                }
            }
            Some("EC PRIVATE KEY") => {
                return Err(KeyError::NotAPrivateKey {
                    hint: ": this is a SEC1 EC key; convert it (openssl pkcs8 -topk8 -nocrypt)",
                })
            }
            Some(l) if l.contains("PUBLIC KEY") => {
                return Err(KeyError::NotAPrivateKey {
                    hint: ": this is a public key",
                })
            }
            _ => return Err(KeyError::NotAPrivateKey { hint: "" }),
        };
        let signer = Self {
            key,
            algorithm,
            issuer: None,
            audience: None,
        };
        // A key of another curve, or a broken one, fails here rather than
        // at the first request.
        signer
            .mint(Uuid::nil(), &[], Duration::from_secs(60))
            .map_err(|e| KeyError::Unusable(e.to_string()))?;
        Ok(signer)
    }

    /// Puts `iss` in the tokens.
    pub fn issuer(mut self, issuer: Option<String>) -> Self {
        self.issuer = issuer;
        self
    }

    /// Puts `aud` in the tokens.
    pub fn audience(mut self, audience: Option<String>) -> Self {
        self.audience = audience;
        self
    }

    /// The algorithm of the tokens.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// A token for `customer` with `scopes`, valid from now for `ttl`.
    pub fn mint(&self, customer: Uuid, scopes: &[&str], ttl: Duration) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = Map::new();
        claims.insert("sub".into(), customer.to_string().into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + ttl.as_secs()).into());
        if !scopes.is_empty() {
            claims.insert("scope".into(), scopes.join(" ").into());
        }
        if let Some(issuer) = &self.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        if let Some(audience) = &self.audience {
            claims.insert("aud".into(), audience.clone().into());
        }
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .context("signing a token")
    }
}

/// The key in the PEM file at `path`, parsed by `parse`; errors name the
/// file and the `setting` that gave it.
fn read_pem<K, E>(
    path: &std::path::Path,
    setting: &str,
    parse: impl FnOnce(&[u8]) -> Result<K, E>,
) -> anyhow::Result<K>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let pem =
        std::fs::read(path).with_context(|| format!("reading {} ({setting})", path.display()))?;
    parse(&pem).with_context(|| format!("{} ({setting})", path.display()))
}

/// The signer of `orders token` and `orders load`: the private key file if
/// given (RS256/ES256), else the shared secret (HS256), with the issuer
/// and audience the API requires; `None` when neither key is given.
pub fn signer_of(
    auth: &crate::cli::AuthArgs,
    private_key: Option<&std::path::Path>,
) -> anyhow::Result<Option<TokenSigner>> {
    let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
    let signer = match (private_key, given(&auth.jwt_secret)) {
        (Some(path), _) => read_pem(
            path,
            "ORDERS_JWT_PRIVATE_KEY / --jwt-private-key",
            TokenSigner::from_private_key_pem,
        )?,
        (None, Some(secret)) => {
            TokenSigner::hs256(secret.as_bytes()).context("ORDERS_JWT_SECRET (--jwt-secret)")?
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(
        signer
            .issuer(given(&auth.jwt_issuer))
            .audience(given(&auth.jwt_audience)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "an-hs256-test-secret-of-32-bytes-or-more";

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().expect("object").clone()
    }

    #[test]
    fn the_subject_is_the_customer_and_scopes_come_from_scope_and_scp() {
        let id = Uuid::new_v4();
        let caller = Caller::from_claims(&claims(json!({
            "sub": id.to_string(),
            "scope": "orders:ship  profile",
            "scp": ["orders:admin"],
        })))
        .expect("caller");
        assert_eq!(caller.customer, id);
        assert_eq!(
            caller.scopes.iter().map(String::as_str).collect::<Vec<_>>(),
            ["orders:admin", "orders:ship", "profile"]
        );
        let caller = Caller::from_claims(&claims(
            json!({ "sub": id.to_string(), "scp": "orders:ship" }),
        ))
        .expect("caller");
        assert!(caller.has_scope(SCOPE_SHIP));
        let caller =
            Caller::from_claims(&claims(json!({ "sub": id.to_string() }))).expect("caller");
        assert!(caller.scopes.is_empty());
    }

    #[test]
    fn a_subject_that_is_not_a_canonical_uuid_is_an_invalid_token() {
        let simple = Uuid::new_v4().simple().to_string();
        for sub in [
            json!("alice"),
            json!(42),
            json!(simple),
            json!(null),
            json!(""),
        ] {
            let error = Caller::from_claims(&claims(json!({ "sub": sub }))).expect_err("rejected");
            assert_eq!(
                (error.status(), error.code()),
                (StatusCode::UNAUTHORIZED, "invalid_token"),
                "{sub}"
            );
        }
        let error = Caller::from_claims(&Map::new()).expect_err("no sub");
        assert_eq!(error.code(), "invalid_token");
    }

    #[test]
    fn scopes_of_the_wrong_type_are_an_invalid_token() {
        let sub = Uuid::new_v4().to_string();
        for bad in [
            json!({ "sub": sub, "scope": ["orders:ship"] }),
            json!({ "sub": sub, "scp": [1] }),
            json!({ "sub": sub, "scp": {} }),
        ] {
            let error = Caller::from_claims(&claims(bad.clone())).expect_err("rejected");
            assert_eq!(error.code(), "invalid_token", "{bad}");
        }
    }

    #[test]
    fn access_rules() {
        let me = Uuid::new_v4();
        let other = Uuid::new_v4();
        let caller = |scopes: &[&str]| {
            Access::Caller(Caller {
                customer: me,
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            })
        };
        assert!(caller(&[]).may_act_for(me));
        assert!(!caller(&[]).may_act_for(other));
        assert!(
            !caller(&[SCOPE_SHIP]).may_act_for(other),
            "a shipper does not read others' orders"
        );
        assert!(caller(&[SCOPE_ADMIN]).may_act_for(other));
        assert_eq!(caller(&[]).owner_filter(), Some(me));
        assert_eq!(caller(&[SCOPE_ADMIN]).owner_filter(), None);
        assert!(caller(&[]).require_scope(SCOPE_SHIP).is_err());
        assert!(caller(&[SCOPE_SHIP]).require_scope(SCOPE_SHIP).is_ok());
        assert!(Access::Open.may_act_for(other));
        assert!(Access::Open.require_scope(SCOPE_SHIP).is_ok());
        assert_eq!(Access::Open.owner_filter(), None);
    }

    #[test]
    fn signed_tokens_verify_and_expiry_has_a_leeway() {
        let signer = TokenSigner::hs256(SECRET.as_bytes()).expect("signer");
        let verifier = Verifier::hs256(SECRET.as_bytes()).expect("verifier");
        let id = Uuid::new_v4();
        let token = signer
            .mint(id, &[SCOPE_SHIP], Duration::from_secs(60))
            .expect("token");
        let caller = verifier.verify(&token).expect("valid");
        assert_eq!(caller.customer, id);
        assert!(caller.has_scope(SCOPE_SHIP));

        let at = |exp_offset: i64| {
            let now = jsonwebtoken::get_current_timestamp() as i64;
            let body = json!({ "sub": id.to_string(), "exp": now + exp_offset });
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &body,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .expect("token")
        };
        // Expired 10 s ago: within the leeway.
        assert!(verifier.verify(&at(-10)).is_ok());
        let error = verifier
            .verify(&at(-(LEEWAY.as_secs() as i64) - 10))
            .expect_err("expired");
        assert_eq!(error.code(), "token_expired");

        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({ "sub": id.to_string() }),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("token");
        let error = verifier.verify(&no_exp).expect_err("no exp");
        assert_eq!(error.code(), "invalid_token");
        assert!(error.message.contains("exp"), "{}", error.message);
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let verifier = Verifier::hs256(SECRET.as_bytes())
            .expect("verifier")
            .issuer("https://id.example")
            .audience("orders");
        let signer = TokenSigner::hs256(SECRET.as_bytes()).expect("signer");
        let id = Uuid::new_v4();
        let ttl = Duration::from_secs(60);
        let bare = signer.mint(id, &[], ttl).expect("token");
        assert_eq!(
            verifier.verify(&bare).expect_err("no iss").code(),
            "invalid_token"
        );
        let wrong = signer
            .clone()
            .issuer(Some("https://id.example".into()))
            .audience(Some("billing".into()))
            .mint(id, &[], ttl)
            .expect("token");
        assert_eq!(
            verifier.verify(&wrong).expect_err("wrong aud").code(),
            "invalid_token"
        );
        let right = signer
            .issuer(Some("https://id.example".into()))
            .audience(Some("orders".into()))
            .mint(id, &[], ttl)
            .expect("token");
        assert_eq!(verifier.verify(&right).expect("valid").customer, id);
    }

    #[test]
    fn short_secrets_and_wrong_pem_files_are_refused() {
        assert!(matches!(
            Verifier::hs256(b"short"),
            Err(KeyError::ShortSecret(5))
        ));
        assert!(matches!(
            TokenSigner::hs256(b"short"),
            Err(KeyError::ShortSecret(5))
        ));
        let error = Verifier::from_public_key_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect_err("a private key");
        assert!(error.to_string().contains("private key"), "{error}");
        assert!(Verifier::from_public_key_pem(b"not a key").is_err());
        assert!(TokenSigner::from_private_key_pem(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        let config = AuthConfig::hs256(SECRET);
        let shown = format!(
            "{config:?} {:?} {:?}",
            config.build().expect("auth"),
            TokenSigner::hs256(SECRET.as_bytes()).expect("signer")
        );
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn no_key_with_jwt_names_the_settings() {
        let config = AuthConfig {
            key: None,
            ..AuthConfig::hs256(SECRET)
        };
        let error = format!("{:#}", config.build().expect_err("no key"));
        assert!(
            error.contains("--jwt-secret") && error.contains("--auth none"),
            "{error}"
        );
        assert!(matches!(AuthConfig::none().build(), Ok(Auth::None)));
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        let missing = Rejection::missing("m").into_response();
        assert_eq!(
            missing.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"orders\""
        );
        let scope = Rejection::insufficient_scope(SCOPE_SHIP).into_response();
        assert_eq!(scope.status(), StatusCode::FORBIDDEN);
        let challenge = scope.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .expect("ascii");
        assert!(
            challenge.starts_with(
                "Bearer realm=\"orders\", error=\"insufficient_scope\", scope=\"orders:ship\""
            ),
            "{challenge}"
        );
    }
}
