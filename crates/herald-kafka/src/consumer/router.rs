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
#[derive(Default, Clone)]
pub struct Router {
    pub(crate) handlers: Vec<Arc<dyn ErasedHandler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.handlers.iter().map(|h| h.name()))
            .finish()
    }
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for family `E` under `name` (used in logs and in
    /// the dead-letter headers). `E` is inferred from the handler: name the
    /// family in the closure's first argument (`|event: OrderEvent, record:
    /// RecordInfo| …`).
    pub fn handle<E: Event, H: Handler<E>>(mut self, name: impl Into<String>, handler: H) -> Self {
        self.handlers.push(Arc::new(Typed::<E, H> {
            name: name.into(),
            handler: Arc::new(handler),
            _family: std::marker::PhantomData,
        }));
        self
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
