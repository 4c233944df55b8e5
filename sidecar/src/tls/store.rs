//! The certificate store: the one place TLS configurations come from.
//!
//! A new certificate, key and bundle are validated (the key matches, the leaf
//! chains to the bundle for both client and server use, it names exactly one
//! SPIFFE ID of our trust domain, it is valid now) and only then published as
//! a fresh pair of rustls configurations behind an [`ArcSwapOption`]. A
//! handshake loads the current pair once; connections already established keep
//! the configuration they started with, so a swap never touches them. Before
//! the first certificate there is nothing to load and every handshake fails
//! closed.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use palisade_proto::{MESH_ALPN, SpiffeId, TrustDomain};
use rustls::{
    ClientConfig, ServerConfig,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use super::verifier::Verification;

/// How many pinned outbound configurations one certificate keeps.
const MAX_PINNED: usize = 4096;

/// A certificate chain, its private key and the trust bundle, not yet checked.
pub struct Material {
    /// The leaf, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Every root the mesh trusts.
    pub roots: Vec<CertificateDer<'static>>,
}

/// The published TLS configurations for one certificate and bundle.
pub struct TlsConfigs {
    identity: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    roots: usize,
    bundle: Vec<CertificateDer<'static>>,
    server: Arc<ServerConfig>,
    client_any: Arc<ClientConfig>,
    /// Pinned configurations of the explicit listeners' upstreams, built once.
    client_registered: HashMap<SpiffeId, Arc<ClientConfig>>,
    /// Pinned configurations built on first use, at most [`MAX_PINNED`].
    client_pinned: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    verification: Verification,
    key: Arc<CertifiedKey>,
}

/// Where the sidecar's TLS configurations are published.
pub struct CertStore {
    trust_domain: TrustDomain,
    pinned_peers: Vec<SpiffeId>,
    /// Built once from the TLS settings; every publish reuses it.
    provider: Arc<CryptoProvider>,
    current: ArcSwapOption<TlsConfigs>,
    changed: watch::Sender<u64>,
}

/// Why new credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the certificate chain is empty")]
    NoCertificate,
    #[error("the trust bundle is empty")]
    NoRoots,
    #[error("the private key cannot be used: {0}")]
    BadKey(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("a root of the trust bundle cannot be used: {0}")]
    BadRoot(String),
    #[error("the certificate does not verify against the trust bundle: {0}")]
    Untrusted(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// Serves one fixed certificate on both sides.
#[derive(Debug)]
pub(crate) struct Fixed(pub(crate) Arc<CertifiedKey>);

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("key", &"...")
            .finish()
    }
}

// === impl CertStore ===

impl CertStore {
    /// An empty store; `pinned_peers` are the identities explicit listeners dial,
    /// for which client configurations are built at each publish.
    pub fn new(trust_domain: TrustDomain, pinned_peers: Vec<SpiffeId>) -> Self {
        Self::with_tls(trust_domain, pinned_peers, &TlsSettings::default())
    }

    /// An empty store whose handshakes use `tls`'s groups and cipher suites.
    pub fn with_tls(
        trust_domain: TrustDomain,
        pinned_peers: Vec<SpiffeId>,
        tls: &TlsSettings,
    ) -> Self {
        Self {
            trust_domain,
            pinned_peers,
            provider: Arc::new(tls.provider()),
            current: ArcSwapOption::empty(),
            changed: watch::Sender::new(0),
        }
    }

    /// The current configurations, if any certificate was ever published.
    pub fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.current.load_full()
    }

    /// Whether a certificate valid at `now` is published.
    pub fn is_ready(&self, now: SystemTime) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| c.not_after > now)
    }

    /// Validates `material` at `now` and publishes it.
    pub fn publish(
        &self,
        material: Material,
        now: SystemTime,
    ) -> Result<Arc<TlsConfigs>, StoreError> {
        let configs = Arc::new(TlsConfigs::build(
            material,
            &self.provider,
            &self.trust_domain,
            &self.pinned_peers,
            now,
        )?);
        self.current.store(Some(configs.clone()));
        self.changed.send_modify(|g| *g += 1);
        Ok(configs)
    }

    /// Fires on every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Our trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("trust_domain", &self.trust_domain)
            .field(
                "current",
                &self.current.load().as_ref().map(|c| c.identity.clone()),
            )
            .finish()
    }
}

// === impl TlsConfigs ===

impl TlsConfigs {
    fn build(
        material: Material,
        provider: &Arc<CryptoProvider>,
        trust_domain: &TrustDomain,
        pinned_peers: &[SpiffeId],
        now: SystemTime,
    ) -> Result<Self, StoreError> {
        if material.chain.is_empty() {
            return Err(StoreError::NoCertificate);
        }
        if material.roots.is_empty() {
            return Err(StoreError::NoRoots);
        }
        let provider = provider.clone();
        let signing_key = provider
            .key_provider
            .load_private_key(material.key)
            .map_err(|e| StoreError::BadKey(e.to_string()))?;
        let key = Arc::new(CertifiedKey::new(material.chain.clone(), signing_key));
        key.keys_match().map_err(|_| StoreError::KeyMismatch)?;

        let verification = Verification::new(&material.roots, trust_domain.clone())
            .map_err(|e| StoreError::BadRoot(format!("{e:?}")))?;
        let unix_now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let (leaf, intermediates) = material
            .chain
            .split_first()
            .ok_or(StoreError::NoCertificate)?;
        // Our certificate must work as both client and server certificate.
        let identity = verification
            .verify(leaf, intermediates, unix_now, true)
            .and_then(|_| verification.verify(leaf, intermediates, unix_now, false))
            .map_err(|e| StoreError::Untrusted(e.to_string()))?;
        let (not_before, not_after) =
            validity(leaf).ok_or_else(|| StoreError::Untrusted("no validity".into()))?;

        let mut configs = Self {
            identity,
            not_before,
            not_after,
            roots: material.roots.len(),
            bundle: material.roots,
            server: Arc::new(server_config(&provider, &verification, &key)?),
            client_any: Arc::new(client_config(&provider, &verification, &key)?),
            client_registered: HashMap::new(),
            client_pinned: Mutex::new(HashMap::new()),
            verification,
            key,
        };
        for peer in pinned_peers {
            let config = Arc::new(configs.pinned(peer));
            configs.client_registered.insert(peer.clone(), config);
        }
        Ok(configs)
    }

    /// The outbound configuration with its verifier pinned to `expected`:
    /// the any-identity one with another verifier, so it cannot fail to
    /// build (and never falls back to any identity). Resumption is off, so
    /// the two share no session that could skip the pinned check.
    fn pinned(&self, expected: &SpiffeId) -> ClientConfig {
        let mut config = ClientConfig::clone(&self.client_any);
        config
            .dangerous()
            .set_certificate_verifier(self.verification.server_verifier(Some(expected.clone())));
        config
    }

    /// Whether `chain` and `roots` are what these configurations were built from.
    pub fn same_material(
        &self,
        chain: &[CertificateDer<'_>],
        roots: &[CertificateDer<'_>],
    ) -> bool {
        self.key.cert == chain && self.bundle == roots
    }

    /// The roots of the trust bundle.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// Our certificate and key, for a TLS client of our own.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.key.clone()
    }

    /// Our identity.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Our certificate's notBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// Our certificate's notAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// How many roots the bundle holds.
    pub fn roots(&self) -> usize {
        self.roots
    }

    /// The inbound (server) configuration.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The outbound (client) configuration; `expected` pins the peer identity.
    ///
    /// A pinned configuration is built once per identity and certificate,
    /// not per connection: at start for the explicit listeners, on first use
    /// for any other (at most [`MAX_PINNED`] kept; past that the cache starts
    /// over).
    pub fn client(&self, expected: Option<&SpiffeId>) -> Arc<ClientConfig> {
        let Some(id) = expected else {
            return self.client_any.clone();
        };
        if let Some(config) = self.client_registered.get(id) {
            return config.clone();
        }
        let mut pinned = self
            .client_pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = pinned.get(id) {
            return config.clone();
        }
        if pinned.len() >= MAX_PINNED {
            pinned.clear();
        }
        let config = Arc::new(self.pinned(id));
        pinned.insert(id.clone(), config.clone());
        config
    }
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("identity", &self.identity)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("roots", &self.roots)
            .field("key", &"...")
            .finish()
    }
}

/// Key-exchange groups and TLS 1.3 cipher suites, each in preference order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TlsSettings {
    pub groups: Vec<KxGroup>,
    pub cipher_suites: Vec<Suite>,
}

/// A key-exchange group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KxGroup {
    /// The post-quantum hybrid (ML-KEM-768 with X25519).
    X25519mlkem768,
    X25519,
    Secp256r1,
}

/// A TLS 1.3 cipher suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    Aes128gcm,
    Aes256gcm,
    Chacha20poly1305,
}

// === impl TlsSettings ===

impl Default for TlsSettings {
    /// The post-quantum hybrid first, X25519 as fallback; AES-128-GCM first
    /// (the fastest with AES-NI, and 128-bit security).
    fn default() -> Self {
        Self {
            groups: vec![KxGroup::X25519mlkem768, KxGroup::X25519],
            cipher_suites: vec![Suite::Aes128gcm, Suite::Aes256gcm, Suite::Chacha20poly1305],
        }
    }
}

impl TlsSettings {
    /// aws-lc-rs limited to these groups and suites.
    pub fn provider(&self) -> CryptoProvider {
        use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
        let kx_groups = self
            .groups
            .iter()
            .map(|g| match g {
                KxGroup::X25519mlkem768 => kx_group::X25519MLKEM768,
                KxGroup::X25519 => kx_group::X25519,
                KxGroup::Secp256r1 => kx_group::SECP256R1,
            })
            .collect();
        let cipher_suites = self
            .cipher_suites
            .iter()
            .map(|s| match s {
                Suite::Aes128gcm => cipher_suite::TLS13_AES_128_GCM_SHA256,
                Suite::Aes256gcm => cipher_suite::TLS13_AES_256_GCM_SHA384,
                Suite::Chacha20poly1305 => cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            })
            .collect();
        CryptoProvider {
            kx_groups,
            cipher_suites,
            ..default_provider()
        }
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    verification: &Verification,
    key: &Arc<CertifiedKey>,
) -> Result<ServerConfig, StoreError> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StoreError::Config(e.to_string()))?
        .with_client_cert_verifier(verification.client_verifier())
        .with_cert_resolver(Arc::new(Fixed(key.clone())));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // Full handshakes only: no tickets, no session cache.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// The outbound configuration that accepts any identity of the trust
/// domain; pinned ones are derived from it ([`TlsConfigs::pinned`]).
fn client_config(
    provider: &Arc<CryptoProvider>,
    verification: &Verification,
    key: &Arc<CertifiedKey>,
) -> Result<ClientConfig, StoreError> {
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StoreError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verification.server_verifier(None))
        .with_client_cert_resolver(Arc::new(Fixed(key.clone())));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    // Peers are named by SPIFFE ID, not by host name.
    config.enable_sni = false;
    Ok(config)
}

/// notBefore and notAfter of a certificate.
fn validity(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        u64::try_from(t.timestamp())
            .ok()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

// === impl Fixed ===

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
