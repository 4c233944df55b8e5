//! The app's kubelet probes, performed by the sidecar: the webhook rewrote
//! each `httpGet`, `tcpSocket` and `grpc` probe to
//! `GET /app-health/<container>/<probe>` on the admin port and wrote the
//! original into `PALISADE_APP_PROBES`. The sidecar runs the original
//! against the app at the pod's own address (`PALISADE_POD_IP`, where
//! kubelet would have probed; loopback without it) and answers `200` when
//! it passed, `503` when not, with a one-line reason.
//!
//! The probe leaves as the proxy's uid, which the capture rules never
//! capture, and arrives at the app directly: nothing is opened to the
//! network, and a dead app fails its probe (the sidecar never answers for
//! it). Like kubelet: HTTP `200..=399` passes, redirects are not followed,
//! HTTPS certificates are not verified, `User-Agent: kube-probe/<version>`
//! unless the probe sets one, gRPC passes on `SERVING`.
//!
//! The admin port is reachable from the pod network, so each probe runs at
//! most once at a time and a result younger than [`REUSE`] is answered
//! again: a flood of probe requests costs the app no more than kubelet's own.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};
use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpStream, sync::Mutex, time::Instant};
use tracing::debug;

/// How long a result is answered again without probing.
pub const REUSE: Duration = Duration::from_millis(250);

/// The `User-Agent` kubelet sends.
const USER_AGENT: &str = "kube-probe/1.33";

/// The probes, by `<container>/<probe>`, as the webhook wrote them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AppProbes(pub BTreeMap<String, AppProbe>);

/// One probe.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// kubelet's default is 1.
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    pub port: u16,
    #[serde(default = "root")]
    pub path: String,
    #[serde(default)]
    pub scheme: Scheme,
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    pub port: u16,
    #[serde(default)]
    pub service: Option<String>,
}

fn one() -> u32 {
    1
}

fn root() -> String {
    "/".to_owned()
}

/// Why `PALISADE_APP_PROBES` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProbesError {
    #[error("not the JSON the webhook writes ({0})")]
    Json(String),
    #[error("probe {0:?} must have exactly one of httpGet, tcpSocket and grpc")]
    Handler(String),
    #[error("probe {0:?} has port 0")]
    Port(String),
    #[error("probe {0:?} is not <container>/<liveness|readiness|startup>")]
    Key(String),
}

impl std::str::FromStr for AppProbes {
    type Err = ProbesError;

    fn from_str(text: &str) -> Result<Self, ProbesError> {
        // serde_json's message can quote the text: say where only.
        let probes: Self = serde_json::from_str(text).map_err(|e| {
            ProbesError::Json(format!("{:?} error at column {}", e.classify(), e.column()))
        })?;
        for (key, probe) in &probes.0 {
            let shown: String = key.chars().take(80).collect();
            let kinds = [
                probe.http_get.is_some(),
                probe.tcp_socket.is_some(),
                probe.grpc.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(ProbesError::Handler(shown));
            }
            if probe.port() == 0 {
                return Err(ProbesError::Port(shown));
            }
            match key.split_once('/') {
                Some((container, "liveness" | "readiness" | "startup"))
                    if !container.is_empty() && !container.contains('/') => {}
                _ => return Err(ProbesError::Key(shown)),
            }
        }
        Ok(probes)
    }
}

impl AppProbe {
    fn port(&self) -> u16 {
        self.http_get
            .as_ref()
            .map(|h| h.port)
            .or(self.tcp_socket.as_ref().map(|t| t.port))
            .or(self.grpc.as_ref().map(|g| g.port))
            .unwrap_or(0)
    }
}

/// Runs the probes for the admin server.
#[derive(Debug)]
pub struct Prober {
    target: IpAddr,
    probes: BTreeMap<String, Slot>,
    tls: Arc<rustls::ClientConfig>,
}

/// One probe and its last result.
#[derive(Debug)]
struct Slot {
    probe: AppProbe,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Prober {
    /// Probes `probes` at `target` (the pod's address; loopback when `None`).
    pub fn new(probes: AppProbes, target: Option<IpAddr>) -> Result<Self, rustls::Error> {
        Ok(Self {
            target: target.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            probes: probes
                .0
                .into_iter()
                .map(|(k, probe)| {
                    (
                        k,
                        Slot {
                            probe,
                            last: Mutex::new(None),
                        },
                    )
                })
                .collect(),
            tls: Arc::new(unverified_tls()?),
        })
    }

    /// The admin routes: `GET /app-health/{container}/{probe}`.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/app-health/{container}/{probe}", get(answer))
            .with_state(self)
    }

    /// Runs the probe `key` (or reuses a result younger than [`REUSE`]);
    /// `None` when there is no such probe.
    pub async fn run(&self, key: &str) -> Option<Result<(), String>> {
        let slot = self.probes.get(key)?;
        let asked = Instant::now();
        let mut last = slot.last.lock().await;
        if let Some((at, result)) = &*last
            && (*at >= asked || at.elapsed() < REUSE)
        {
            return Some(result.clone());
        }
        let timeout = Duration::from_secs(u64::from(slot.probe.timeout_seconds.max(1)));
        let result = match tokio::time::timeout(timeout, self.probe(&slot.probe)).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        debug!(probe = key, ok = result.is_ok(), "ran an app probe");
        *last = Some((Instant::now(), result.clone()));
        Some(result)
    }

    async fn probe(&self, probe: &AppProbe) -> Result<(), String> {
        let addr = SocketAddr::new(self.target, probe.port());
        if let Some(get) = &probe.http_get {
            return self.http(addr, get).await;
        }
        if probe.grpc.is_some() {
            let service = probe.grpc.as_ref().and_then(|g| g.service.clone());
            return grpc(addr, service.unwrap_or_default()).await;
        }
        // tcpSocket: the app accepts, that is all.
        TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("connect {addr}: {}", e.kind()))
    }

    async fn http(&self, addr: SocketAddr, get: &HttpGet) -> Result<(), String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {}", e.kind()))?;
        let mut request = Request::get(&get.path);
        let mut has = (false, false, false);
        for header in &get.http_headers {
            let name = header.name.to_ascii_lowercase();
            has.0 |= name == "host";
            has.1 |= name == "user-agent";
            has.2 |= name == "accept";
            request = request.header(header.name.as_str(), header.value.as_str());
        }
        if !has.0 {
            request = request.header("host", addr.to_string());
        }
        if !has.1 {
            request = request.header("user-agent", USER_AGENT);
        }
        if !has.2 {
            request = request.header("accept", "*/*");
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|_| "the probe's path or headers do not form a request".to_owned())?;
        let status = match get.scheme {
            Scheme::Http => send(tcp, request).await?,
            Scheme::Https => {
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {addr}: {}", e.kind()))?;
                send(tls, request).await?
            }
        };
        if (200..400).contains(&status.as_u16()) {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

/// Sends `request` over `io` (HTTP/1.1) and returns the status.
async fn send<IO>(io: IO, request: Request<Empty<Bytes>>) -> Result<hyper::StatusCode, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    connection.abort();
    Ok(response?.status())
}

/// `grpc.health.v1.Health/Check` of `service` over plaintext HTTP/2.
async fn grpc(addr: SocketAddr, service: String) -> Result<(), String> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("gRPC endpoint: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("gRPC connect {addr}: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await
        .map_err(|status| format!("gRPC health: {:?}", status.code()))?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("gRPC health: {}", other.as_str_name())),
    }
}

async fn answer(
    State(prober): State<Arc<Prober>>,
    Path((container, probe)): Path<(String, String)>,
) -> (StatusCode, String) {
    match prober.run(&format!("{container}/{probe}")).await {
        None => (StatusCode::NOT_FOUND, "no such probe\n".to_owned()),
        Some(Ok(())) => (StatusCode::OK, "ok\n".to_owned()),
        Some(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// TLS that accepts any server certificate, as kubelet's HTTPS probes do
/// (the probe checks the app answers, not who it is).
fn unverified_tls() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts every certificate; still checks the handshake's signatures, so
/// the connection is a real TLS one.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
