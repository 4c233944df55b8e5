//! The TLS check, before the rounds: what each side of a system really
//! negotiates (version, suite, group, ALPN, client certificate) and that
//! resumption is off. Each client-side proxy is pointed at a rustls server
//! here that issues tickets and would resume any session offered; a rustls
//! client here that keeps tickets connects to each server-side proxy. Both
//! count resumed handshakes; the client also counts the tickets it received.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use anyhow::{Context, Result};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
    client::{ClientSessionMemoryCache, ClientSessionStore, Resumption},
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};

use super::systems::{Ctx, Side, System, start_side};
use crate::{
    certs::{CertFiles, LeafFiles},
    load::{Backend, CONNECT_TIMEOUT, echo_conn},
    process::free_port,
};

/// Connections of each side's check.
pub const PROBE_CONNECTIONS: usize = 3;
/// The mesh ALPN; Palisade's inbound side requires it.
const ALPN: &[u8] = b"palisade/1";

/// What one handshake negotiated.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub version: String,
    pub suite: String,
    pub group: String,
    pub resumed: bool,
    pub alpn: String,
    /// Whether the peer presented a certificate.
    pub peer_cert: bool,
}

/// What each side of a system negotiated with the probes here.
#[derive(Debug)]
pub struct TlsCheck {
    /// The client-side proxy as seen by a rustls server that would resume.
    pub client: Vec<Handshake>,
    /// The server-side proxy as seen by a rustls client that keeps tickets.
    pub server: Vec<Handshake>,
    /// Session tickets the server side sent to the probe client.
    pub tickets: u64,
}

/// The rustls client's session store, counting the TLS 1.3 tickets received.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicU64,
}

/// Checks both sides of `sys`, each on a proxy started for the check.
pub async fn tls_check(ctx: &Ctx, sys: System, backend: &Backend) -> Result<TlsCheck> {
    // The client side against a rustls server.
    let listener = StdListener::bind("127.0.0.1:0")?;
    let probe_addr = listener.local_addr()?;
    let config = probe_server_config(&ctx.certs)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("tls-probe-server".into())
        .spawn(move || {
            for tcp in listener.incoming() {
                let result = tcp
                    .map_err(anyhow::Error::from)
                    .and_then(|tcp| probe_serve(tcp, config.clone()));
                if tx.send(result).is_err() {
                    return;
                }
            }
        })?;
    let client_side = {
        let entry = free_port()?;
        let proc = start_side(ctx, sys, Side::Client, entry, probe_addr)?;
        let mut seen = Vec::new();
        for _ in 0..PROBE_CONNECTIONS {
            let tcp = echo_conn(entry).await.with_context(|| {
                format!("a connection through {} to the probe server", proc.name())
            })?;
            drop(tcp);
            let hs = rx
                .recv_timeout(CONNECT_TIMEOUT)
                .context("the probe server saw no handshake")??;
            seen.push(hs);
        }
        seen
    };
    // The server side against a rustls client.
    let tls = free_port()?;
    let proc = start_side(ctx, sys, Side::Server, tls, backend.addr)?;
    let store = Arc::new(CountingStore::new());
    let config = probe_client_config(&ctx.certs, store.clone())?;
    let server_side = tokio::task::spawn_blocking(move || {
        (0..PROBE_CONNECTIONS)
            .map(|_| probe_connect(tls, config.clone()))
            .collect::<Result<Vec<_>>>()
    })
    .await
    .context("the probe client panicked")??;
    drop(proc);
    Ok(TlsCheck {
        client: client_side,
        server: server_side,
        tickets: store.tickets.load(Ordering::Relaxed),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(c: &CertFiles) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(c.ca_der.clone())?;
    Ok(Arc::new(roots))
}

fn key_der(leaf: &LeafFiles) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()))
}

/// A server that requires a client certificate, issues tickets and resumes
/// any session a client offers.
fn probe_server_config(c: &CertFiles) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(c)?, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![c.server.der.clone()], key_der(&c.server))?;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A client with the client leaf that keeps every ticket in `store`.
fn probe_client_config(c: &CertFiles, store: Arc<CountingStore>) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(c)?)
        .with_client_auth_cert(vec![c.client.der.clone()], key_der(&c.client))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::store(store);
    Ok(Arc::new(config))
}

fn describe(conn: &rustls::CommonState) -> Handshake {
    Handshake {
        version: conn
            .protocol_version()
            .map_or("-".into(), |v| format!("{v:?}")),
        suite: conn
            .negotiated_cipher_suite()
            .map_or("-".into(), |s| format!("{:?}", s.suite())),
        group: conn
            .negotiated_key_exchange_group()
            .map_or("-".into(), |g| format!("{:?}", g.name())),
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        alpn: conn
            .alpn_protocol()
            .map_or("-".into(), |a| String::from_utf8_lossy(a).into_owned()),
        peer_cert: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
    }
}

/// One connection of the probe server: handshake, echo one byte, wait for EOF.
fn probe_serve(tcp: StdStream, config: Arc<ServerConfig>) -> Result<Handshake> {
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let conn = ServerConnection::new(config)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let hs = describe(&tls.conn);
    let mut b = [0u8; 1];
    tls.read_exact(&mut b)?;
    tls.write_all(&b)?;
    tls.flush()?;
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    Ok(hs)
}

/// One connection of the probe client: handshake, one byte and its echo.
fn probe_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<Handshake> {
    let tcp = StdStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let conn = ClientConnection::new(config, ServerName::try_from("localhost")?)?;
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(b"E")?;
    tls.flush()?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b)?;
    let hs = describe(&tls.conn);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(hs)
}

// === impl CountingStore ===

impl CountingStore {
    fn new() -> Self {
        Self {
            inner: ClientSessionMemoryCache::new(64),
            tickets: AtomicU64::new(0),
        }
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value);
    }
    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(server_name, value);
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}
