//! The discovery stream's client: one long-lived `Watch` to the control
//! plane, applied to [`Destinations`].
//!
//! The stream is opened over TLS that proves both sides: the control plane's
//! serving certificate is checked against the bundle file and the mesh's
//! current roots (as `Certify` does), and the sidecar presents its own mesh
//! certificate, which the control plane checks against the address the
//! connection comes from. So the stream waits for the first certificate, and
//! every reconnect presents the certificate in use then.
//!
//! A renewed certificate replaces the stream with one that presents it. A
//! lost stream keeps the last state in use (connections keep being decided
//! on what was known) and reconnects with capped, jittered exponential
//! backoff; a reconnect starts again from a fresh snapshot. A message that
//! does not decode is refused whole, counted, and answered by reconnecting.

use std::{path::PathBuf, sync::Arc, time::Duration};

use palisade_proto::discovery::v1::{
    WatchRequest, WatchResponse, discovery_client::DiscoveryClient as GrpcClient,
};
use palisade_runtime::metrics::Outcome;
use rustls::{
    ClientConfig, RootCertStore,
    client::WebPkiServerVerifier,
    pki_types::{CertificateDer, ServerName},
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};

use super::{ApplyError, Destinations};
use crate::{
    identity::refresh::Schedule,
    metrics::{Known, Metrics},
    policy::{DenyList, Policy, PolicyStore},
    tls::{CertStore, TlsConfigs, store::Fixed},
};

/// Largest message accepted: a snapshot of a large cluster (10,000 pods
/// take about 600 KB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The HTTP/2 receive window the stream advertises (the connection carries
/// this one stream). hyper's defaults, 2 MiB a stream and 5 MiB a
/// connection, let the control plane queue up to h2's 400 KiB send buffer
/// for every stream during a snapshot: with a thousand sidecars reconnecting
/// at once, that is the control plane's memory. A snapshot part is about
/// 16 KiB, so 64 KiB keeps several in flight, which on a cluster network
/// (a millisecond or less of round trip) is tens of MB/s: a snapshot of
/// 10,000 pods still arrives in well under a second.
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// Where the stream goes and how it retries.
#[derive(Clone, Debug, Serialize)]
pub struct StreamConfig {
    /// `https://host:port` of the control plane's gRPC API.
    pub control_plane: String,
    /// The DNS name in the control plane's serving certificate.
    pub server_name: String,
    /// PEM file with the roots that may sign the control plane's certificate.
    pub bundle_file: PathBuf,
    /// Connecting (TCP and TLS) gives up after this long.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The reconnect backoff (its base and cap).
    pub retry: Schedule,
}

/// Keeps [`Destinations`] in step with the control plane.
#[derive(Debug)]
pub struct DiscoveryClient {
    config: StreamConfig,
    store: Arc<CertStore>,
    destinations: Arc<Destinations>,
    /// Where the delivered policy and deny list go; `None`: ignored.
    policy: Option<Arc<PolicyStore>>,
    metrics: Metrics,
}

/// Why a stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot read the trust bundle {path}: {error}")]
    Bundle {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the trust bundle {path} holds no usable root")]
    NoRoots { path: PathBuf },
    #[error("the control plane address {addr} is not https://HOST:PORT")]
    Address { addr: String },
    #[error("cannot reach the control plane at {addr}: {error}")]
    Connect {
        addr: String,
        error: tonic::transport::Error,
    },
    #[error("the control plane at {addr} refused the discovery stream ({code:?}): {message}")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the control plane ended the discovery stream")]
    Ended,
    #[error("refused a discovery message: {0}")]
    Apply(#[from] ApplyError),
}

// === impl DiscoveryClient ===

impl DiscoveryClient {
    pub fn new(
        config: StreamConfig,
        store: Arc<CertStore>,
        destinations: Arc<Destinations>,
        metrics: Metrics,
    ) -> Self {
        Self {
            config,
            store,
            destinations,
            policy: None,
            metrics,
        }
    }

    /// Puts the policy and deny list the stream delivers into `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: Arc<PolicyStore>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Puts a delivered policy or deny list in use. A bad one is refused,
    /// counted and logged, and the one in use stays: the stream goes on.
    fn apply_policy(&self, message: &WatchResponse) {
        let Some(store) = &self.policy else {
            return;
        };
        let trust_domain = self.store.trust_domain();
        if let Some(delivered) = &message.policy {
            match Policy::from_wire(delivered, trust_domain) {
                Ok(policy) => {
                    info!(
                        version = policy.version(),
                        policies = delivered.policies.len(),
                        mode = ?policy.mode(),
                        "policy: the control plane's policy for this pod is in force"
                    );
                    self.metrics.policy_in_force(&policy);
                    store.set(policy);
                }
                Err(error) => {
                    self.metrics
                        .discovery_update(Outcome::Failure, false, Known::default());
                    warn!(%error, "policy: refused the delivered policy; the one in use stays");
                }
            }
        }
        if let Some(delivered) = &message.deny_list {
            match DenyList::from_wire(delivered, trust_domain) {
                Ok(list) => {
                    info!(
                        version = list.version(),
                        entries = list.len(),
                        "policy: the deny list is in force"
                    );
                    store.set_deny_list(list);
                }
                Err(error) => {
                    self.metrics
                        .discovery_update(Outcome::Failure, false, Known::default());
                    warn!(%error, "policy: refused the delivered deny list; the one in use stays");
                }
            }
        }
    }

    /// Follows the control plane until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut certificates = self.store.subscribe();
        let mut failures = 0u32;
        loop {
            // Without a certificate there is nothing to present yet.
            let Some(configs) = self.store.current() else {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = certificates.changed() => continue,
                }
            };
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                result = self.follow(&configs) => Some(result),
                // A renewed certificate: reconnect presenting it at once,
                // before the control plane ends the stream at the old one's
                // expiry.
                _ = certificates.changed() => None,
            };
            self.metrics.stream_connected(false);
            let Some((delivered, error)) = ended else {
                debug!("discovery: reconnecting with the renewed certificate");
                failures = 0;
                continue;
            };
            if delivered {
                failures = 0;
            }
            let wait =
                self.config
                    .retry
                    .backoff(failures, Duration::ZERO, rand::random_range(0.0..=1.0));
            failures = failures.saturating_add(1);
            warn!(
                %error,
                retry_in = ?wait,
                known = self.destinations.len(),
                "discovery: the stream is down; the last state stays in use"
            );
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens one stream and applies it until it fails. Returns whether it
    /// delivered a snapshot, and why it ended.
    async fn follow(&self, configs: &TlsConfigs) -> (bool, StreamError) {
        let addr = &self.config.control_plane;
        let stream = async {
            let channel = self.connect(configs).await?;
            GrpcClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .watch(WatchRequest {})
                .await
                .map_err(|status| StreamError::Refused {
                    addr: addr.clone(),
                    code: status.code(),
                    message: status.message().to_owned(),
                })
        }
        .await;
        let mut stream = match stream {
            Ok(response) => {
                self.metrics.stream_open(Outcome::Success);
                response.into_inner()
            }
            Err(error) => {
                self.metrics.stream_open(Outcome::Failure);
                return (false, error);
            }
        };
        let mut delivered = false;
        loop {
            let message = stream.message().await;
            if !matches!(message, Ok(Some(_))) {
                // A snapshot cut short by the stream's end is never used.
                self.destinations.abandon_partial();
            }
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => return (delivered, StreamError::Ended),
                Err(status) => {
                    return (
                        delivered,
                        StreamError::Refused {
                            addr: addr.clone(),
                            code: status.code(),
                            message: status.message().to_owned(),
                        },
                    );
                }
            };
            self.apply_policy(&message);
            match self.destinations.apply(&message) {
                Ok(applied) if applied.partial => {
                    debug!(set = applied.set, "discovery: a part of a snapshot");
                }
                Ok(applied) => {
                    let known = Known {
                        addresses: self.destinations.len(),
                        services: self.destinations.services(),
                    };
                    self.metrics
                        .discovery_update(Outcome::Success, applied.snapshot, known);
                    if applied.snapshot {
                        delivered = true;
                        self.metrics.stream_connected(true);
                        info!(
                            addresses = known.addresses,
                            services = known.services,
                            "discovery: snapshot applied"
                        );
                    } else {
                        debug!(
                            set = applied.set,
                            removed = applied.removed,
                            "discovery: changes applied"
                        );
                    }
                }
                Err(error) => {
                    self.destinations.abandon_partial();
                    self.metrics
                        .discovery_update(Outcome::Failure, false, Known::default());
                    return (delivered, error.into());
                }
            }
        }
    }

    /// A channel to the control plane over TLS that presents `configs`'
    /// certificate.
    async fn connect(&self, configs: &TlsConfigs) -> Result<Channel, StreamError> {
        let c = &self.config;
        let pem = std::fs::read(&c.bundle_file).map_err(|error| StreamError::Bundle {
            path: c.bundle_file.clone(),
            error,
        })?;
        let mut roots = RootCertStore::empty();
        let from_file = ::pem::parse_many(&pem)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()));
        let (added, _) =
            roots.add_parsable_certificates(from_file.chain(configs.bundle().iter().cloned()));
        if added == 0 {
            return Err(StreamError::NoRoots {
                path: c.bundle_file.clone(),
            });
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|_| StreamError::NoRoots {
                    path: c.bundle_file.clone(),
                })?;
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| StreamError::NoRoots {
                path: c.bundle_file.clone(),
            })?
            .with_webpki_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Fixed(configs.certified_key())));
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let address_error = || StreamError::Address {
            addr: c.control_plane.clone(),
        };
        let uri: Uri = c.control_plane.parse().map_err(|_| address_error())?;
        let authority = uri.authority().ok_or_else(address_error)?.clone();
        if uri.scheme_str() != Some("https") || authority.port_u16().is_none() {
            return Err(address_error());
        }
        let server_name =
            ServerName::try_from(c.server_name.clone()).map_err(|_| address_error())?;
        // The TLS is ours (it presents the mesh certificate), so tonic sees
        // a plain `http` endpoint and our connector wraps the connection.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|error| StreamError::Connect {
                addr: c.control_plane.clone(),
                error,
            })?
            .connect_timeout(c.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(STREAM_WINDOW);
        let connector = TlsConnector::from(Arc::new(tls));
        let target = authority.to_string();
        let connect = tower::service_fn(move |_: Uri| {
            let (connector, target, server_name) =
                (connector.clone(), target.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(&target).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        endpoint
            .connect_with_connector(connect)
            .await
            .map_err(|error| StreamError::Connect {
                addr: c.control_plane.clone(),
                error,
            })
    }
}
