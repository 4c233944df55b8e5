//! The gRPC server on 15012: TLS with a serving certificate the CA issues to
//! itself, so sidecars verify the control plane with the trust bundle alone.
//!
//! The serving certificate is re-issued when the issuer changes and at half its
//! lifetime. TLS handshakes run in their own tasks under a timeout, so a client
//! that stalls its handshake holds nothing but its own socket.

use std::{
    future::Future,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use palisade_proto::identity::v1::identity_server::IdentityServer;
use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{ca::CaStore, service::IdentityService};

/// How long the control plane's own serving certificate lives.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Limits of the gRPC server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A Certify call is cancelled after this long.
    pub request_timeout: Duration,
    /// A TLS handshake is abandoned after this long.
    pub handshake_timeout: Duration,
    /// At most this many handshakes run at once; further connections wait.
    pub max_pending_handshakes: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

/// The control plane's serving certificate, swapped as it is renewed.
#[derive(Debug)]
pub struct ServingCert {
    names: Vec<String>,
    current: ArcSwap<CertifiedKey>,
    not_after: ArcSwap<SystemTime>,
}

/// Why the serving certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("{0:?} is neither a DNS name nor an IP address; check --server-name")]
    BadName(String),
    #[error("cannot issue the serving certificate: {0}")]
    Issue(String),
}

// === impl ServingCert ===

impl ServingCert {
    /// Issues the first serving certificate for `names` (DNS names or IPs).
    pub fn new(ca: &CaStore, names: Vec<String>) -> Result<Self, ServingCertError> {
        let (key, not_after) = issue(ca, &names)?;
        Ok(Self {
            names,
            current: ArcSwap::from_pointee(key),
            not_after: ArcSwap::from_pointee(not_after),
        })
    }

    /// Issues a fresh serving certificate from the current issuer.
    pub fn renew(&self, ca: &CaStore) -> Result<(), ServingCertError> {
        let (key, not_after) = issue(ca, &self.names)?;
        self.current.store(Arc::new(key));
        self.not_after.store(Arc::new(not_after));
        Ok(())
    }

    /// Renews on every issuer change and at half of each certificate's lifetime,
    /// until `shutdown`.
    pub async fn maintain(self: Arc<Self>, ca: Arc<CaStore>, shutdown: impl Future<Output = ()>) {
        let mut changed = ca.subscribe();
        tokio::pin!(shutdown);
        loop {
            let remaining = self
                .not_after
                .load()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                () = &mut shutdown => return,
                r = changed.changed() => if r.is_err() { return },
                () = tokio::time::sleep(remaining / 2) => {}
            }
            match self.renew(&ca) {
                Ok(()) => info!(names = ?self.names, "renewed the gRPC serving certificate"),
                Err(error) => {
                    warn!(%error, "cannot renew the gRPC serving certificate; retrying in 30s");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(ca: &CaStore, names: &[String]) -> Result<(CertifiedKey, SystemTime), ServingCertError> {
    let issuer = ca.issuer();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServingCertError::Issue(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "palisade-control-plane");
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| ServingCertError::BadName(n.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    let not_after = (now + SERVING_CERT_LIFETIME).min(issuer.not_after());
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = not_after.into();
    let leaf = issuer
        .sign(&params, &key)
        .map_err(|e| ServingCertError::Issue(e.to_string()))?;

    let mut chain = vec![leaf];
    chain.extend(issuer.chain().iter().cloned());
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| ServingCertError::Issue(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signing_key), not_after))
}

/// The TLS configuration of the gRPC server: TLS 1.3 and 1.2 (for clients
/// outside the mesh), ALPN h2, no client certificate (callers authenticate
/// with a token).
pub fn server_tls(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `Identity` on `listener` until `shutdown`, then drains in-flight calls.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: IdentityService,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = mpsc::channel(limits.max_pending_handshakes.max(1));
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        limits.max_pending_handshakes.max(1),
    ));
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, "grpc accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let timeout = limits.handshake_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "grpc TLS handshake failed"),
                    Err(_) => debug!(%peer, "grpc TLS handshake timed out"),
                }
            });
        }
    });

    let result = tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            IdentityServer::new(service)
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(1024 * 1024),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept_loop.abort();
    result
}
