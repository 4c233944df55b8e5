//! The sidecar streams: a client certificate per stream pod from the real
//! `Certify`, and one tonic `Watch` client per stream over its own mTLS
//! connection from its pod's loopback address.
//!
//! Each client decodes every message, as a sidecar does, but keeps no state:
//! it looks for the marker of the change in flight, and reports when a
//! snapshot is complete (the part with `partial = false`). A storm makes
//! every client drop its connection and reconnect at once.
//!
//! The TLS is built as the sidecar's discovery client builds it
//! (`palisade_sidecar::discovery::client`: rustls with aws-lc-rs, ALPN `h2`,
//! the mesh certificate as client certificate, `TCP_NODELAY`, its HTTP/2
//! window `STREAM_WINDOW`, tonic over a custom connector), with one difference: the socket is bound to the pod's
//! address before it connects. The sidecar's connector cannot be given a
//! source address (in a pod it needs none), so it is not reused here.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use palisade_proto::{
    discovery::v1::{WatchRequest, WatchResponse, discovery_client::DiscoveryClient},
    identity::v1::{CertifyRequest, identity_client::IdentityClient},
};
use palisade_sidecar::discovery::client::STREAM_WINDOW;
use prost::Message as _;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
};
use tokio::{
    net::TcpSocket,
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use super::cluster::StreamPod;

/// Largest message accepted, as the sidecar's client.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// A failed connect or stream is retried after this long.
const RETRY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a stream client reports.
#[derive(Debug)]
pub enum Event {
    /// Stream `stream`, connected in storm generation `generation`, holds a
    /// complete snapshot; `marker` is the change in flight it contained.
    Snapshot {
        stream: usize,
        generation: u64,
        at: Instant,
        marker: Option<u64>,
        bytes: usize,
    },
    /// A change message carried the marker of change `change`.
    Change {
        stream: usize,
        change: u64,
        at: Instant,
    },
    /// A connect or a stream failed; the client retries.
    Failed { stream: usize, why: String },
}

/// The change in flight: its number and the address its message names.
#[derive(Debug, Default)]
pub struct InFlight(Mutex<Option<(u64, Vec<u8>)>>);

/// Everything the clients share.
#[derive(Debug)]
pub struct Clients {
    pub in_flight: Arc<InFlight>,
    /// Bumped to make every client reconnect at once.
    pub storm: watch::Sender<u64>,
    pub events: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
}

/// One stream's credentials and source address.
#[derive(Debug)]
pub struct Credentials {
    source: Ipv4Addr,
    tls: Arc<ClientConfig>,
}

// === impl InFlight ===

impl InFlight {
    pub fn set(&self, change: Option<(u64, Vec<u8>)>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = change;
    }

    /// The change in flight if `message` names its address.
    fn seen_in(&self, message: &WatchResponse) -> Option<u64> {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (id, marker) = guard.as_ref()?;
        let named = message.addresses.iter().any(|a| a.ip == *marker)
            || message.removed.iter().any(|ip| ip == marker)
            || message.services.iter().any(|s| s.ip == *marker)
            || message.removed_services.iter().any(|ip| ip == marker);
        named.then_some(*id)
    }
}

// === impl Clients ===

impl Clients {
    /// Starts one client per stream against the control plane at `grpc`;
    /// they connect at once.
    pub fn start(credentials: Vec<Credentials>, grpc: SocketAddr) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let in_flight = Arc::new(InFlight::default());
        let storm = watch::Sender::new(0);
        let mut tasks = JoinSet::new();
        for (stream, credentials) in credentials.into_iter().enumerate() {
            tasks.spawn(client(
                stream,
                credentials,
                grpc,
                in_flight.clone(),
                storm.subscribe(),
                tx.clone(),
            ));
        }
        Self {
            in_flight,
            storm,
            events,
            tasks,
        }
    }

    /// Stops every client (their connections close).
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// A key, a CSR and `Certify` for each pod, 32 calls in flight; `token(i)`
/// is pod `i`'s static token.
pub async fn certify_all(
    pods: &[StreamPod],
    grpc: SocketAddr,
    ca_pem: &[u8],
    token: impl Fn(usize) -> String,
) -> Result<Vec<Credentials>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .context("building the gRPC endpoint")?
        .tls_config(tls)
        .context("configuring TLS for Certify")?
        .connect()
        .await
        .with_context(|| format!("connecting to the control plane at {grpc} for Certify"))?;
    let mut credentials: Vec<Option<Credentials>> = (0..pods.len()).map(|_| None).collect();
    for (chunk_start, chunk) in pods.chunks(32).enumerate().map(|(n, c)| (n * 32, c)) {
        let mut calls = JoinSet::new();
        for (offset, pod) in chunk.iter().enumerate() {
            let index = chunk_start + offset;
            let (pod, token, channel) = (pod.clone(), token(index), channel.clone());
            calls.spawn(async move { (index, certify(pod, token, channel).await) });
        }
        while let Some(joined) = calls.join_next().await {
            let (index, result) = joined.context("a Certify task panicked")?;
            credentials[index] = Some(result?);
        }
    }
    Ok(credentials.into_iter().flatten().collect())
}

async fn certify(pod: StreamPod, token: String, channel: Channel) -> Result<Credentials> {
    let san = Ia5String::try_from(pod.identity.as_str())
        .with_context(|| format!("{} is not an IA5 string", pod.identity))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(san)];
    let csr = params.serialize_request(&key)?;
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: pod.identity.clone(),
            token: token.into_bytes(),
            csr: csr.der().to_vec(),
            requested_lifetime: None,
        })
        .await
        .with_context(|| format!("Certify for {}", pod.identity))?
        .into_inner();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(
        response
            .trust_bundle
            .iter()
            .map(|der| CertificateDer::from(der.clone())),
    );
    anyhow::ensure!(added > 0, "the Certify response carries no usable root");
    let mut chain = vec![CertificateDer::from(response.certificate)];
    chain.extend(response.intermediates.into_iter().map(CertificateDer::from));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .context("installing the client certificate")?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Credentials {
        source: pod.address,
        tls: Arc::new(tls),
    })
}

/// One stream: connect, follow, and on a storm or failure connect again.
async fn client(
    stream: usize,
    credentials: Credentials,
    grpc: SocketAddr,
    in_flight: Arc<InFlight>,
    mut storm: watch::Receiver<u64>,
    events: mpsc::UnboundedSender<Event>,
) {
    let connector = TlsConnector::from(credentials.tls.clone());
    let source = SocketAddr::from((credentials.source, 0));
    let failed = |why: String| {
        let _ = events.send(Event::Failed { stream, why });
    };
    loop {
        let generation = *storm.borrow_and_update();
        let opened = async {
            let channel = connect(&connector, source, grpc).await?;
            let response = DiscoveryClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .watch(WatchRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("Watch refused ({:?}): {}", s.code(), s.message()))?;
            Ok::<_, anyhow::Error>(response.into_inner())
        };
        let mut messages = match opened.await {
            Ok(messages) => messages,
            Err(error) => {
                failed(format!("{error:#}"));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut marker = None;
        let mut bytes = 0;
        loop {
            let message = tokio::select! {
                _ = storm.changed() => break,
                message = messages.message() => message,
            };
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => {
                    failed("the control plane ended the stream".into());
                    tokio::time::sleep(RETRY).await;
                    break;
                }
                Err(status) => {
                    failed(format!(
                        "stream error ({:?}): {}",
                        status.code(),
                        status.message()
                    ));
                    tokio::time::sleep(RETRY).await;
                    break;
                }
            };
            let at = Instant::now();
            let seen = in_flight.seen_in(&message);
            if message.snapshot {
                marker = marker.or(seen);
                bytes += message.encoded_len();
                if !message.partial {
                    let _ = events.send(Event::Snapshot {
                        stream,
                        generation,
                        at,
                        marker: marker.take(),
                        bytes: std::mem::take(&mut bytes),
                    });
                }
            } else if let Some(change) = seen {
                let _ = events.send(Event::Change { stream, change, at });
            }
        }
    }
}

/// A tonic channel over our TLS from `source` to `grpc`.
async fn connect(
    connector: &TlsConnector,
    source: SocketAddr,
    grpc: SocketAddr,
) -> Result<Channel> {
    let server_name = ServerName::try_from("localhost").expect("a valid DNS name");
    // The TLS is ours, so tonic sees a plain `http` endpoint.
    let endpoint = Endpoint::from_shared(format!("http://{grpc}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        // The sidecar's window: it bounds what the control plane queues per stream.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW);
    let connector = connector.clone();
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, server_name) = (connector.clone(), server_name.clone());
        async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(source)?;
            socket.set_nodelay(true)?;
            let tcp = socket.connect(grpc).await?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .with_context(|| format!("connecting from {source} to {grpc}"))
}

/// Opens one stream with `credentials` and returns its whole snapshot, part
/// by part, retrying (the control plane answers UNAVAILABLE until its
/// sources have synced) until `deadline`.
pub async fn probe(
    credentials: &Credentials,
    grpc: SocketAddr,
    deadline: Instant,
) -> Result<Vec<WatchResponse>> {
    let connector = TlsConnector::from(credentials.tls.clone());
    let source = SocketAddr::from((credentials.source, 0));
    let mut last_error = None;
    while Instant::now() < deadline {
        let attempt = async {
            let channel = connect(&connector, source, grpc).await?;
            let mut messages = DiscoveryClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .watch(WatchRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("Watch refused ({:?}): {}", s.code(), s.message()))?
                .into_inner();
            let mut parts = Vec::new();
            while let Some(part) = messages.message().await? {
                anyhow::ensure!(
                    part.snapshot,
                    "a change arrived before the snapshot was whole"
                );
                let last = !part.partial;
                parts.push(part);
                if last {
                    return Ok(parts);
                }
            }
            anyhow::bail!("the stream ended inside its snapshot")
        };
        match tokio::time::timeout_at(deadline.into(), attempt).await {
            Ok(Ok(parts)) => return Ok(parts),
            Ok(Err(error)) => last_error = Some(error),
            Err(_) => break,
        }
        tokio::time::sleep(RETRY).await;
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no snapshot"))
        .context("the probe stream got no snapshot in time"))
}
