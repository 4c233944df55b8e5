//! The data plane: accepts connections, puts them in or takes them out of mesh
//! TLS, and relays bytes.
//!
//! - [`inbound`]: peers into the app (15006, or an explicit listener).
//! - [`outbound`]: the app out to peers (15001, or an explicit listener).
//! - [`detect`]: mesh TLS, other TLS or plaintext, from the first bytes.
//! - [`handshake`]: the one place a mesh handshake is timed, classified and
//!   counted.
//! - [`relay`]: both directions, half-close, byte counts, idle timeout.
//! - [`prefixed`]: replaying the bytes detection read.
//! - [`buffers`]: pooled buffers held only while bytes move.
//!
//! [`serve`] is the accept loop every listener shares: a connection limit
//! (the loop holds each connection's permit until its task ends), a span and
//! a tracked task per connection, and a drain on shutdown.

pub mod access;
pub mod buffers;
pub mod detect;
pub mod handshake;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod prefixed;
pub mod relay;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, debug, warn};

use crate::{
    discovery::Destinations,
    metrics::{HandshakeFailure, Metrics},
    policy::PolicyStore,
    tls::{CertStore, TlsConfigs},
};

/// Timeouts of the data plane.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// A TLS handshake is abandoned after this long.
    #[serde(with = "humantime_serde")]
    pub handshake: Duration,
    /// A client that sends nothing is dropped after this long.
    #[serde(with = "humantime_serde")]
    pub detect: Duration,
    /// On a server-first port in permissive mode, how long a client's
    /// silence is awaited before the connection is taken for the app's own
    /// (a mesh client sends its ClientHello at once).
    #[serde(with = "humantime_serde")]
    pub server_first_wait: Duration,
    /// Connecting to the app or to a peer gives up after this long.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// A connection on which nothing moves is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle: Option<Duration>,
}

/// What every connection handler needs.
#[derive(Debug)]
pub struct Proxy {
    /// Our certificate and the bundle.
    pub store: Arc<CertStore>,
    /// The inbound authorization policy.
    pub policy: Arc<PolicyStore>,
    /// What discovery says must answer at each address (empty, and unused,
    /// without discovery).
    pub destinations: Arc<Destinations>,
    /// Where connections are counted.
    pub metrics: Metrics,
    /// Timeouts.
    pub limits: Limits,
    /// The opt-in access log.
    pub access_log: access::AccessLog,
    /// The pod's own addresses, the only inbound original destinations.
    pub local: Arc<local::LocalAddrs>,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy that runs at most `max_connections` connections at once.
    pub fn new(
        store: Arc<CertStore>,
        policy: Arc<PolicyStore>,
        metrics: Metrics,
        limits: Limits,
        max_connections: usize,
    ) -> Self {
        Self {
            store,
            policy,
            destinations: Arc::new(Destinations::default()),
            metrics,
            limits,
            access_log: access::AccessLog::Off,
            local: Arc::new(local::LocalAddrs::read()),
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
            tracker: TaskTracker::new(),
        }
    }

    /// The TLS configurations for a new handshake, or why none can start:
    /// without a valid certificate of our own every handshake fails closed.
    fn configs(&self) -> Result<Arc<TlsConfigs>, HandshakeFailure> {
        let Some(configs) = self.store.current() else {
            debug!("no certificate yet: failing closed");
            return Err(HandshakeFailure::NoCertificate);
        };
        if configs.not_after() <= SystemTime::now() {
            debug!(identity = %configs.identity(), "our certificate expired: failing closed");
            return Err(HandshakeFailure::Expired);
        }
        Ok(configs)
    }

    /// Waits until every connection has ended, or `deadline` passes; returns
    /// how many were still open then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }
}

/// Accepts on `listener` until `shutdown`, running `handle` for each
/// connection in a tracked task inside a span made by `span`.
pub async fn serve<H, F>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: CancellationToken,
    span: impl Fn(SocketAddr) -> Span,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = proxy.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off rather than spin.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let connection = handle(tcp, peer);
        proxy.tracker.spawn(
            async move {
                connection.await;
                drop(permit);
            }
            .instrument(span(peer)),
        );
    }
}

/// The destination the kernel redirected this connection from (`SO_ORIGINAL_DST`).
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if tcp.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
}

/// Connects to `addr` within `timeout`.
async fn connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => {
            let tcp = result?;
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
