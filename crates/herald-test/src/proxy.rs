//! A TCP proxy on 127.0.0.1 in front of a real server (PostgreSQL, or a
//! Kafka broker that advertises the proxy: see
//! [`crate::private::PrivateKafka::start_behind_proxy`]), to put a client
//! through the network faults a production link has, without disturbing
//! the other tests that use the server directly:
//!
//! - [`FaultProxy::cut`]: every connection closed and new ones refused (the
//!   server's host went away), until [`FaultProxy::restore`];
//! - [`FaultProxy::reset_connections`]: every open connection closed once,
//!   new ones let through (a load balancer's or NAT's idle cut);
//! - [`FaultProxy::black_hole`]: connections stay open and new ones are
//!   accepted, but no byte moves either way: a network partition, where
//!   TCP keeps what was sent and delivers it if the partition heals before
//!   the client gives up (so the byte stream stays intact: a client sees
//!   silence, never corruption);
//! - [`FaultProxy::delay`]: every byte delivered that much later in each
//!   direction (a slow link; throughput is kept, only latency is added).
//!
//! The proxy runs on a thread and runtime of its own, so it keeps
//! forwarding while a test's runtime is busy or blocked, and it stops when
//! its last handle is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to traffic now. Every connection watches it.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Bumped by every cut: connections opened before it close.
    generation: u64,
    /// New connections are closed at once.
    refusing: bool,
    /// No byte is forwarded, either way.
    black_hole: bool,
    /// Added to every byte's delivery, each way.
    delay: Duration,
}

/// A handle to a running proxy. Clones control the same proxy; it stops
/// when the last one is dropped.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    address: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    accepted: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy to `target` (`host:port`) on a free local port.
    pub fn start(target: &str) -> FaultProxy {
        Self::start_on(0, target)
    }

    /// Starts a proxy to `target` on local `port` (0: a free one). The
    /// target need not be up yet: a connection made before it is closed.
    pub fn start_on(port: u16, target: &str) -> FaultProxy {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("proxy address");
        let (faults, watching) = watch::channel(Faults::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let target = target.to_owned();
        std::thread::Builder::new()
            .name(format!("fault-proxy-{}", address.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                runtime.block_on(accept(listener, target, watching, counter));
            })
            .expect("the proxy's thread");
        FaultProxy {
            address,
            faults: Arc::new(faults),
            accepted,
        }
    }

    /// `host:port` of the proxy.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How many connections the proxy has accepted (refused ones included):
    /// proof that a client's traffic went through it.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection and refuses new ones, until
    /// [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.faults.send_modify(|f| {
            f.generation += 1;
            f.refusing = true;
        });
    }

    /// Closes every open connection once; new ones are let through.
    pub fn reset_connections(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// Stops every byte, either way, on open and new connections alike,
    /// until [`FaultProxy::restore`]; what was sent meanwhile is delivered
    /// then (unless the client closed the connection first).
    pub fn black_hole(&self) {
        self.faults.send_modify(|f| f.black_hole = true);
    }

    /// Delivers every byte `delay` later, each way (on top of any other
    /// fault), until [`FaultProxy::restore`].
    pub fn delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.delay = delay);
    }

    /// Lets everything through again at once: no refusal, no black hole,
    /// no delay.
    pub fn restore(&self) {
        self.faults.send_modify(|f| {
            f.refusing = false;
            f.black_hole = false;
            f.delay = Duration::ZERO;
        });
    }
}

/// Accepts until every handle is gone, a task per connection.
async fn accept(
    listener: std::net::TcpListener,
    target: String,
    mut faults: watch::Receiver<Faults>,
    accepted: Arc<AtomicU64>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("the proxy's listener");
    loop {
        let inbound = tokio::select! {
            inbound = listener.accept() => inbound,
            // Every handle dropped: the proxy stops (dropping the runtime
            // ends its connections).
            closed = faults.changed() => match closed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        let Ok((inbound, _)) = inbound else { continue };
        accepted.fetch_add(1, Ordering::SeqCst);
        let now = faults.borrow().clone();
        if now.refusing {
            drop(inbound);
            continue;
        }
        let (target, faults) = (target.clone(), faults.clone());
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            let (inbound_read, inbound_write) = inbound.into_split();
            let (outbound_read, outbound_write) = outbound.into_split();
            let mut cut = faults.clone();
            tokio::select! {
                _ = async {
                    tokio::join!(
                        forward(inbound_read, outbound_write, faults.clone()),
                        forward(outbound_read, inbound_write, faults),
                    )
                } => {}
                _ = cut.wait_for(|f| f.generation > now.generation) => {}
            }
        });
    }
}

/// Moves bytes from `from` to `to` as the faults allow, until either side
/// closes: a reader that stamps each chunk with its delivery time, and a
/// writer that waits for that time and for the black hole to lift, so a
/// delay adds latency without cutting throughput.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, faults: watch::Receiver<Faults>) {
    let (chunks, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = {
        let faults = faults.clone();
        async move {
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buffer).await {
                let delay = faults.borrow().delay;
                if chunks
                    .send((Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    };
    let write = async move {
        let mut faults = faults;
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if faults.wait_for(|f| !f.black_hole).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on a free port, for the proxy to front.
    fn echo() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buffer) {
                        if stream.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        address
    }

    fn connect(proxy: &FaultProxy) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(proxy.address()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
    }

    fn round_trip(stream: &mut std::net::TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message)?;
        let mut answer = vec![0u8; message.len()];
        stream.read_exact(&mut answer)?;
        Ok(answer)
    }

    #[test]
    fn passes_delays_holds_and_cuts_traffic() {
        let proxy = FaultProxy::start(&echo().to_string());
        let mut stream = connect(&proxy);
        assert_eq!(round_trip(&mut stream, b"hello").expect("echo"), b"hello");

        proxy.delay(Duration::from_millis(150));
        let sent = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow").expect("echo"), b"slow");
        assert!(
            sent.elapsed() >= Duration::from_millis(300),
            "a delay each way: {:?}",
            sent.elapsed()
        );
        proxy.restore();

        // A black hole: nothing comes back while it lasts, and what was sent
        // arrives intact once it lifts.
        proxy.black_hole();
        stream.write_all(b"held").expect("write");
        stream
            .set_read_timeout(Some(Duration::from_millis(400)))
            .expect("timeout");
        let mut answer = [0u8; 4];
        let silent = stream.read(&mut answer);
        assert!(silent.is_err(), "nothing through a black hole: {silent:?}");
        proxy.restore();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.read_exact(&mut answer).expect("delivered after it");
        assert_eq!(&answer, b"held");

        // A reset closes the open connection; a new one passes.
        proxy.reset_connections();
        let mut closed = [0u8; 1];
        assert!(matches!(stream.read(&mut closed), Ok(0) | Err(_)));
        let mut fresh = connect(&proxy);
        assert_eq!(round_trip(&mut fresh, b"again").expect("echo"), b"again");

        // A cut closes it and refuses new ones until restored.
        proxy.cut();
        assert!(matches!(fresh.read(&mut closed), Ok(0) | Err(_)));
        let mut refused = connect(&proxy);
        assert!(round_trip(&mut refused, b"no").is_err());
        proxy.restore();
        let mut back = connect(&proxy);
        assert_eq!(round_trip(&mut back, b"back").expect("echo"), b"back");
        assert!(proxy.accepted() >= 4, "{}", proxy.accepted());
    }
}
