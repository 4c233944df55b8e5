//! The control plane's own serving certificate, issued by its CA: sidecars,
//! and the API server calling the webhook, verify the control plane with the
//! trust bundle alone.
//!
//! It is re-issued when the issuer changes and at half its lifetime; both
//! TLS servers (gRPC and the webhook) resolve it on every handshake.

use std::{
    future::Future,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

use super::CaStore;

/// How long the control plane's own serving certificate lives.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

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
                Ok(()) => info!(names = ?self.names, "renewed the serving certificate"),
                Err(error) => {
                    warn!(%error, "cannot renew the serving certificate; retrying in 30s");
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
