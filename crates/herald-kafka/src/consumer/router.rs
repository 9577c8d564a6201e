//! The router: typed handlers registered per event family, chosen per record
//! by its `event_type`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use herald::{DecodeError, Envelope, Event, HandlerError};

/// What a handler knows about the record it handles.
#[derive(Debug, Clone)]
pub struct RecordInfo {
    /// The topic the record came from.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The consumer group handling it.
    pub group_id: Arc<str>,
    /// The decoded envelope (event id, key, times, trace context).
    pub envelope: Arc<Envelope>,
    /// 1 on the first try, 2 on the first retry, and so on.
    pub attempt: u32,
    /// Every record of the partition before this offset was done (handled,
    /// dead-lettered or skipped) when this one started: what a store that
    /// keeps offsets may record as the partition's next offset.
    pub done_below: Option<i64>,
}

impl RecordInfo {
    /// Where the record was read: what an inbox that keeps offsets records
    /// (`herald_postgres::Inbox::apply_at`).
    pub fn position(&self) -> herald::Position {
        herald::Position {
            topic: Arc::clone(&self.topic),
            partition: self.partition,
            offset: self.offset,
            done_below: self.done_below,
        }
    }
}

/// Handles one family of events. Implemented for every
/// `Fn(E, RecordInfo) -> impl Future<Output = Result<(), HandlerError>>`.
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// Applies `event`. Return [`HandlerError::transient`] to be retried with
    /// backoff, [`HandlerError::permanent`] to dead-letter the record at once.
    fn handle(
        &self,
        event: E,
        record: RecordInfo,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<E, F, Fut> Handler<E> for F
where
    E: Event,
    F: Fn(E, RecordInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        event: E,
        record: RecordInfo,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(event, record)
    }
}

/// What [`Router::handle`] takes: a [`Handler`] of the family `E`, or a
/// closure that also takes the router's state, `Fn(S, E, RecordInfo) ->
/// impl Future<Output = Result<(), HandlerError>>` (each call gets a clone
/// of the state given to [`Router::with_state`]). `M` tells the two forms
/// apart ([`Stateless`] or [`WithState`]); it is inferred, never written.
pub trait IntoHandler<E: Event, S, M>: Sized {
    /// The handler the router keeps.
    type Handler: Handler<E>;

    /// Makes the handler, with the router's `state` if it takes it.
    fn into_handler(self, state: &S) -> Self::Handler;
}

/// [`IntoHandler`]'s marker for a handler that takes no state.
#[derive(Debug)]
pub enum Stateless {}

/// [`IntoHandler`]'s marker for a closure that takes the router's state first.
#[derive(Debug)]
pub enum WithState {}

impl<E: Event, S, H: Handler<E>> IntoHandler<E, S, Stateless> for H {
    type Handler = H;

    fn into_handler(self, _state: &S) -> H {
        self
    }
}

impl<E, S, F, Fut> IntoHandler<E, S, WithState> for F
where
    E: Event,
    S: Clone + Send + Sync + 'static,
    F: Fn(S, E, RecordInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    type Handler = Stateful<S, F>;

    fn into_handler(self, state: &S) -> Stateful<S, F> {
        Stateful {
            state: state.clone(),
            handler: self,
        }
    }
}

/// A closure with the state it is handed on each call (see
/// [`Router::with_state`]).
#[derive(Debug)]
pub struct Stateful<S, F> {
    state: S,
    handler: F,
}

impl<E, S, F, Fut> Handler<E> for Stateful<S, F>
where
    E: Event,
    S: Clone + Send + Sync + 'static,
    F: Fn(S, E, RecordInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        event: E,
        record: RecordInfo,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.handler)(self.state.clone(), event, record)
    }
}

/// A failure of one routed handler call.
#[derive(Debug)]
pub(crate) enum RouteFailure {
    /// The payload does not decode as the handler's family.
    Decode(DecodeError),
    /// The handler failed.
    Handler(HandlerError),
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<(), RouteFailure>> + Send>>;

/// A handler with its family erased, so one router can hold many families.
pub(crate) trait ErasedHandler: Send + Sync {
    fn name(&self) -> &str;
    fn accepts(&self, event_type: &str) -> bool;
    fn call(&self, record: RecordInfo) -> BoxFuture;
}

struct Typed<E, H> {
    name: String,
    handler: Arc<H>,
    _family: std::marker::PhantomData<fn() -> E>,
}

impl<E: Event, H: Handler<E>> ErasedHandler for Typed<E, H> {
    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, event_type: &str) -> bool {
        E::is_known_type(event_type)
    }

    fn call(&self, record: RecordInfo) -> BoxFuture {
        let handler = Arc::clone(&self.handler);
        Box::pin(async move {
            let event: E = record.envelope.decode().map_err(RouteFailure::Decode)?;
            handler
                .handle(event, record)
                .await
                .map_err(RouteFailure::Handler)
        })
    }
}

/// Typed handlers for the records of the topics a consumer reads.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct OrderPlaced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum OrderEvent { OrderPlaced(OrderPlaced) }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct Invoiced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum BillingEvent { Invoiced(Invoiced) }
/// use herald::HandlerError;
/// use herald_kafka::{RecordInfo, Router};
/// // One handler per family; a record runs every handler whose family
/// // knows its event_type.
/// let router = Router::new()
///     .handle("orders", |_: OrderEvent, _: RecordInfo| async {
///         Ok::<_, HandlerError>(())
///     })
///     .handle("billing", |_: BillingEvent, _: RecordInfo| async {
///         Ok::<_, HandlerError>(())
///     });
/// assert_eq!(format!("{router:?}"), r#"["orders", "billing"]"#);
/// ```
///
/// Every handler whose family knows a record's `event_type` runs for it, in
/// registration order. A record no handler knows is *unknown*: skipped and
/// counted, or dead-lettered (see `ConsumerConfig::dead_letter_unknown`).
///
/// Handlers that share state (a pool, a client) take it from the router
/// instead of cloning it into each closure, as axum's handlers do:
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::EventPayload)]
/// # struct OrderPlaced {
/// #     #[event(id)] event_id: uuid::Uuid,
/// #     #[event(key)] order_id: uuid::Uuid,
/// #     #[event(time)] at: chrono::DateTime<chrono::Utc>,
/// # }
/// # #[derive(Debug, Clone, Serialize, Deserialize, herald::Event)]
/// # #[serde(tag = "event_type")]
/// # #[event(aggregate = "order")]
/// # enum OrderEvent { OrderPlaced(OrderPlaced) }
/// use std::sync::{Arc, Mutex};
/// use herald::HandlerError;
/// use herald_kafka::{RecordInfo, Router};
/// type Seen = Arc<Mutex<Vec<uuid::Uuid>>>;
/// let seen = Seen::default();
/// let router = Router::with_state(Arc::clone(&seen)).handle(
///     "audit",
///     |seen: Seen, OrderEvent::OrderPlaced(placed): OrderEvent, _: RecordInfo| async move {
///         seen.lock().unwrap().push(placed.order_id);
///         Ok::<_, HandlerError>(())
///     },
/// );
/// # let _ = router;
/// ```
#[derive(Clone)]
pub struct Router<S = ()> {
    pub(crate) handlers: Vec<Arc<dyn ErasedHandler>>,
    state: S,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.handlers.iter().map(|h| h.name()))
            .finish()
    }
}

impl Router {
    /// An empty router whose handlers take no state.
    pub fn new() -> Self {
        Self::with_state(())
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// An empty router that hands a clone of `state` to each call of the
    /// handlers that ask for it (closures whose first argument is `S`).
    pub fn with_state(state: S) -> Self {
        Self {
            handlers: Vec::new(),
            state,
        }
    }

    /// Registers `handler` for family `E` under `name` (used in logs and in
    /// the dead-letter headers). `E` is inferred from the handler: name the
    /// family in the closure's event argument (`|event: OrderEvent, record:
    /// RecordInfo| …`, or `|state: S, event: OrderEvent, record: RecordInfo|
    /// …` for one that takes the router's state).
    pub fn handle<E: Event, M>(
        mut self,
        name: impl Into<String>,
        handler: impl IntoHandler<E, S, M>,
    ) -> Self {
        self.handlers.push(Arc::new(Typed::<E, _> {
            name: name.into(),
            handler: Arc::new(handler.into_handler(&self.state)),
            _family: std::marker::PhantomData,
        }));
        self
    }
}

impl<S> Router<S> {
    /// The same handlers in a router of no state: each handler already holds
    /// its clone of the state. For code that keeps routers of several state
    /// types in one place ([`crate::Consumer::new`] takes any `Router<S>`).
    pub fn erase_state(self) -> Router {
        Router {
            handlers: self.handlers,
            state: (),
        }
    }

    /// The handlers that take `event_type`, with their registration index.
    pub(crate) fn handlers_for<'a>(
        &'a self,
        event_type: &'a str,
    ) -> impl Iterator<Item = (usize, &'a Arc<dyn ErasedHandler>)> + 'a {
        self.handlers
            .iter()
            .enumerate()
            .filter(move |(_, h)| h.accepts(event_type))
    }
}
