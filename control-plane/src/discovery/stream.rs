//! The `Watch` stream: who may open one, which pod it is bound to, and what
//! it sends.
//!
//! A caller must present a mesh client certificate, verified in the TLS
//! handshake against the CA's bundle ([`crate::tls::server_config`]); tonic
//! keeps it and the peer address beside the request ([`Caller::of`]). The stream is then bound to the one live, meshed pod
//! at the address the connection comes from whose identity is the
//! certificate's: a certificate stolen from one pod cannot open a stream
//! from another address, and a pod cannot pose as another service account.
//! The binding is checked again whenever the caller's own address changes,
//! and the stream ends when the certificate expires, so a caller always
//! reconnects with the certificate it renewed.
//!
//! What is sent: a snapshot of every known address and Service, then each
//! batch of changes as the sources make it. The snapshot is shared by every
//! stream that starts from it and encoded a part at a time (`partial`), so a
//! stream holds one part encoded, never the whole state: a reconnect storm
//! of a thousand sidecars costs a thousand parts in flight, not a thousand
//! copies of the cluster. A stream that falls too far behind the broadcast
//! gets a fresh snapshot instead of the changes it missed.
//!
//! The first part of every snapshot also carries the bound pod's policy and
//! the deny list; after it, each is sent again only when its version moves.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::Stream;
use palisade_proto::{
    SpiffeId,
    discovery::{
        encode, encode_ip, encode_service,
        v1::{
            DenyList, PodPolicy, WatchRequest, WatchResponse,
            discovery_server::Discovery as DiscoveryApi,
        },
    },
};
use palisade_runtime::verifier::spiffe_id;
use rustls::pki_types::CertificateDer;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::state::{BindError, Changes, Discovery, Snapshot};
use crate::metrics::{ActiveStream, Metrics, StreamEnd, StreamRefusal};

/// Who is on the other end of a gRPC connection, as its TLS handshake
/// established it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The address the connection comes from.
    pub addr: SocketAddr,
    /// The verified client certificate's identity and notAfter, when the
    /// caller presented one.
    pub certificate: Option<(SpiffeId, SystemTime)>,
}

/// The discovery API.
#[derive(Clone, Debug)]
pub struct DiscoveryService {
    discovery: Arc<Discovery>,
    metrics: Metrics,
}

/// Addresses per snapshot part (about 16 KiB encoded). Small parts keep
/// what one stream holds encoded, and the buffers that grow to the largest
/// message and keep that capacity, small: the control plane's memory in a
/// reconnect storm is per stream.
const PART_ADDRESSES: usize = 256;

/// Service endpoints per snapshot part (a part holds at least one Service,
/// whatever its size).
const PART_ENDPOINTS: usize = 256;

/// A stream's state between messages.
struct Watch {
    discovery: Arc<Discovery>,
    metrics: Metrics,
    changes: Receiver<Changes>,
    /// The snapshot still to send, and how much of it is sent.
    snapshot: Option<Sending>,
    address: IpAddr,
    identity: SpiffeId,
    pod: String,
    /// The bound pod's key and namespace: whose policy this stream sends.
    pod_key: String,
    namespace: String,
    /// The versions last sent.
    policy_version: String,
    deny_version: String,
    expires: tokio::time::Instant,
    ended: bool,
    _active: ActiveStream,
}

/// A snapshot being sent in parts.
struct Sending {
    snapshot: Arc<Snapshot>,
    addresses: usize,
    services: usize,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

// === impl Caller ===

impl Caller {
    /// The caller of `request`, from what tonic kept of its connection's
    /// TLS handshake; `None` without a peer address (not our listener).
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        Some(Self {
            addr: request.remote_addr()?,
            certificate: request
                .peer_certs()
                .and_then(|chain| chain.first().and_then(certificate_facts)),
        })
    }
}

/// The identity and notAfter of a client certificate the handshake has
/// verified (chain, usage, one SPIFFE ID of the trust domain).
fn certificate_facts(leaf: &CertificateDer<'_>) -> Option<(SpiffeId, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let identity = spiffe_id(leaf).ok()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((identity, SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
}

// === impl DiscoveryService ===

impl DiscoveryService {
    pub fn new(discovery: Arc<Discovery>, metrics: Metrics) -> Self {
        Self { discovery, metrics }
    }

    /// Opens a stream for `caller`, or refuses it, counted and logged.
    pub(crate) fn open(&self, caller: Option<Caller>) -> Result<Response<WatchStream>, Status> {
        let caller = caller.as_ref();
        let watch = match self.admit(caller) {
            Ok(watch) => watch,
            Err((reason, status)) => {
                self.metrics.stream_refused(reason);
                warn!(
                    peer = ?caller.map(|c| c.addr),
                    identity = ?caller.and_then(|c| c.certificate.as_ref()).map(|(id, _)| id.as_str()),
                    %reason,
                    error = status.message(),
                    "discovery: refused a stream"
                );
                return Err(status);
            }
        };
        info!(pod = %watch.pod, identity = %watch.identity, address = %watch.address, "discovery: stream open");
        let stream = futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Authenticates and binds the caller, or says why not.
    fn admit(&self, caller: Option<&Caller>) -> Result<Watch, (StreamRefusal, Status)> {
        let Some(Caller {
            addr,
            certificate: Some((identity, not_after)),
        }) = caller
        else {
            return Err((
                StreamRefusal::NoClientCert,
                Status::unauthenticated(
                    "discovery needs a mesh client certificate: connect with the sidecar's certificate",
                ),
            ));
        };
        if !self.discovery.is_synced() {
            return Err((
                StreamRefusal::NotSynced,
                Status::unavailable(
                    "the control plane has not synced its discovery sources yet; retry",
                ),
            ));
        }
        let address = addr.ip().to_canonical();
        let pod = self.discovery.bind(address, identity).map_err(|error| {
            let reason = match error {
                BindError::NoPod(_) => StreamRefusal::NoPod,
                BindError::Contested(_) => StreamRefusal::Contested,
                BindError::OtherIdentity { .. } => StreamRefusal::OtherIdentity,
            };
            (reason, Status::permission_denied(error.to_string()))
        })?;
        // The handshake checked the certificate when the connection opened;
        // a request later on the same connection may come after it expired.
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left.is_zero() {
            return Err((
                StreamRefusal::CertificateExpired,
                Status::unauthenticated(
                    "the client certificate has expired; reconnect with the renewed one",
                ),
            ));
        }
        let (snapshot, changes) = self.discovery.subscribe();
        let namespace = pod.name.split('/').next().unwrap_or_default().to_owned();
        Ok(Watch {
            discovery: self.discovery.clone(),
            metrics: self.metrics.clone(),
            changes,
            snapshot: Some(Sending::new(snapshot)),
            address,
            identity: identity.clone(),
            pod: pod.name,
            pod_key: pod.key,
            namespace,
            policy_version: String::new(),
            deny_version: String::new(),
            expires: tokio::time::Instant::now() + left,
            ended: false,
            _active: self.metrics.stream_opened(),
        })
    }
}

#[tonic::async_trait]
impl DiscoveryApi for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.open(Caller::of(&request))
    }
}

// === impl Watch ===

impl Watch {
    /// The next message, the error that ends the stream, or `None` after it.
    async fn next(&mut self) -> Option<Result<WatchResponse, Status>> {
        if self.ended {
            return None;
        }
        if let Some(sending) = &mut self.snapshot {
            let first = sending.addresses == 0 && sending.services == 0;
            let mut part = sending.next_part();
            if !part.partial {
                self.snapshot = None;
            }
            if first {
                // Asked after subscribing: a change in between is sent
                // again, never missed.
                part.policy = self.discovery.pod_policy(&self.pod_key);
                part.deny_list = Some((*self.discovery.deny_list()).clone());
                self.sent(part.policy.as_ref(), part.deny_list.as_ref());
            }
            return Some(Ok(part));
        }
        tokio::select! {
            () = tokio::time::sleep_until(self.expires) => {
                self.end(StreamEnd::CertificateExpired);
                Some(Err(Status::unauthenticated(
                    "the client certificate expired; reconnect with the renewed one",
                )))
            }
            received = self.changes.recv() => match received {
                Ok(changes) => match self.changed(&changes) {
                    Ok(Some(message)) => Some(Ok(message)),
                    // Nothing of this batch concerns this stream.
                    Ok(None) => Box::pin(self.next()).await,
                    Err(status) => Some(Err(status)),
                },
                Err(RecvError::Lagged(missed)) => {
                    debug!(missed, pod = %self.pod, "discovery: stream fell behind; sending a fresh snapshot");
                    self.metrics.stream_resynced();
                    let (snapshot, changes) = self.discovery.subscribe();
                    self.changes = changes;
                    self.snapshot = Some(Sending::new(snapshot));
                    Box::pin(self.next()).await
                }
                Err(RecvError::Closed) => {
                    self.end(StreamEnd::Shutdown);
                    None
                }
            },
        }
    }

    /// One batch as a message; the stream ends instead when the batch moved
    /// the caller's own address away from its pod.
    fn changed(&mut self, changes: &Changes) -> Result<Option<WatchResponse>, Status> {
        if changes.addresses.iter().any(|(a, _)| *a == self.address) {
            match self.discovery.bind(self.address, &self.identity) {
                // Another pod of the same identity may have taken over.
                Ok(bound) => self.pod_key = bound.key,
                Err(error) => {
                    info!(pod = %self.pod, %error, "discovery: the caller's pod is gone; ending its stream");
                    self.end(StreamEnd::Unbound);
                    return Err(Status::permission_denied(error.to_string()));
                }
            }
        }
        let mut message = WatchResponse::default();
        for (address, resolution) in &changes.addresses {
            match resolution {
                Some(r) => message.addresses.push(encode(*address, r)),
                None => message.removed.push(encode_ip(*address)),
            }
        }
        for (address, service) in &changes.services {
            match service {
                Some(s) => message.services.push(encode_service(*address, s)),
                None => message.removed_services.push(encode_ip(*address)),
            }
        }
        if changes.policies.all
            && let Ok(bound) = self.discovery.bind(self.address, &self.identity)
        {
            // After a relist the pod at the caller's address may be tracked
            // under another key: the policy is always the bound pod's.
            self.pod_key = bound.key;
        }
        if changes.policies.covers(&self.pod_key, &self.namespace) {
            message.policy = self
                .discovery
                .pod_policy(&self.pod_key)
                .filter(|p| p.version != self.policy_version);
        }
        message.deny_list = changes
            .deny_list
            .as_ref()
            .filter(|d| d.version != self.deny_version)
            .map(|d| (**d).clone());
        self.sent(message.policy.as_ref(), message.deny_list.as_ref());
        if message == WatchResponse::default() {
            return Ok(None);
        }
        self.metrics.update_sent();
        Ok(Some(message))
    }

    /// Notes the versions of what is being sent.
    fn sent(&mut self, policy: Option<&PodPolicy>, deny_list: Option<&DenyList>) {
        if let Some(policy) = policy {
            debug!(pod = %self.pod, version = %policy.version, policies = policy.policies.len(), "discovery: sending the pod's policy");
            self.policy_version.clone_from(&policy.version);
        }
        if let Some(deny_list) = deny_list {
            self.deny_version.clone_from(&deny_list.version);
        }
    }

    fn end(&mut self, why: StreamEnd) {
        self.ended = true;
        self.metrics.stream_ended(why);
    }
}

// === impl Sending ===

impl Sending {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            snapshot,
            addresses: 0,
            services: 0,
        }
    }

    /// The next part: addresses first, then Services; `partial` while more
    /// remains. An empty state is one empty, final part.
    fn next_part(&mut self) -> WatchResponse {
        let mut part = WatchResponse {
            snapshot: true,
            ..WatchResponse::default()
        };
        let addresses = &self.snapshot.addresses[self.addresses..];
        if !addresses.is_empty() {
            let take = addresses.len().min(PART_ADDRESSES);
            part.addresses = addresses[..take]
                .iter()
                .map(|(a, r)| encode(*a, r))
                .collect();
            self.addresses += take;
        } else {
            let mut endpoints = 0;
            for (address, service) in &self.snapshot.services[self.services..] {
                let size: usize = service.ports.iter().map(|p| p.endpoints.len()).sum();
                if !part.services.is_empty() && endpoints + size > PART_ENDPOINTS {
                    break;
                }
                endpoints += size;
                part.services.push(encode_service(*address, service));
                self.services += 1;
            }
        }
        part.partial = self.addresses < self.snapshot.addresses.len()
            || self.services < self.snapshot.services.len();
        part
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.stream_ended(StreamEnd::Closed);
            debug!(pod = %self.pod, "discovery: stream closed by the caller");
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("pod", &self.pod)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}
