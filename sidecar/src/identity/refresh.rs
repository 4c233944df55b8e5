//! When to renew: at half of a certificate's lifetime, give or take a tenth
//! of it, so that a fleet started together does not renew together; after a
//! failure, retry with capped, jittered exponential backoff, never waiting so
//! long that the certificate in use expires first.
//!
//! All waits are tokio time, so tests run with `start_paused = true`.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use palisade_runtime::{metrics::Outcome, watch::FileWatch};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{CertifyError, Credentials, IdentityClient};
use crate::{
    metrics::Metrics,
    tls::{CertStore, Material, StoreError, TlsConfigs},
};

/// Renewal timing.
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    /// Never renew sooner than this after an issuance.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Never wait longer than this between renewals.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// First retry delay after a failure.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
}

// === impl Schedule ===

impl Default for Schedule {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(12 * 60 * 60),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

impl Schedule {
    /// How long after issuance to renew a certificate living `lifetime`.
    /// `jitter` is uniform in [-1, 1]: 50 % ± 10 % of the lifetime.
    pub fn renew_after(&self, lifetime: Duration, jitter: f64) -> Duration {
        let fraction = 0.5 + 0.1 * jitter.clamp(-1.0, 1.0);
        lifetime
            .mul_f64(fraction)
            .clamp(self.min_interval, self.max_interval.max(self.min_interval))
    }

    /// How long to wait before retry number `attempt` (0 for the first), with
    /// `remaining` validity left on the certificate in use (zero when none).
    /// `jitter` is uniform in [0, 1]: full jitter over the upper half.
    pub fn backoff(&self, attempt: u32, remaining: Duration, jitter: f64) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let mut cap = self.backoff_cap;
        // Leave room for several more tries before the certificate expires.
        if !remaining.is_zero() {
            cap = cap.min(remaining / 4);
        }
        let delay = exp.min(cap);
        let jittered = delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        jittered.max(Duration::from_millis(50))
    }
}

/// Keeps a certificate from the control plane in `store`: certify, publish,
/// sleep until the renewal point, again; on failure keep what is in use and
/// back off. The trust bundle in use is the union of the bundle of the last
/// response and the bundle file, which is watched: a root added to or removed
/// from the file applies at once, without waiting for a renewal. Ends at `stop`.
pub async fn run(
    client: impl Certifier,
    store: Arc<CertStore>,
    metrics: Metrics,
    schedule: Schedule,
    stop: CancellationToken,
) {
    let bundle_file = client.bundle_file().to_owned();
    let mut watch = match FileWatch::new(&[bundle_file.as_path()]) {
        Ok(w) => Some(w),
        Err(error) => {
            warn!(%error, file = %bundle_file.display(), "cannot watch the bundle file; its changes apply at the next renewal");
            None
        }
    };
    let mut held: Option<Held> = None;
    let mut failures = 0u32;
    let mut deadline = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(deadline) => {}
            () = bundle_changed(&mut watch) => {
                if let Some(held) = &mut held {
                    republish_with_file_roots(held, &bundle_file, &store, &metrics);
                }
                continue;
            }
        }
        let last_roots = held
            .as_ref()
            .map(|h| h.response_roots.clone())
            .unwrap_or_default();
        let wait = match renew(&client, &store, &last_roots, &bundle_file).await {
            Ok((configs, renewed, serial)) => {
                failures = 0;
                held = Some(renewed);
                metrics.renewal(Outcome::Success);
                metrics.certificate_installed(
                    configs.identity().as_str(),
                    (configs.not_before(), configs.not_after()),
                    configs.roots(),
                );
                let lifetime = configs
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let wait = schedule.renew_after(lifetime, rand::random_range(-1.0..=1.0));
                info!(
                    identity = %configs.identity(),
                    serial = %serial,
                    not_after = %humantime::format_rfc3339_seconds(configs.not_after()),
                    roots = configs.roots(),
                    next_renewal_in = ?wait,
                    "renewed the certificate"
                );
                wait
            }
            Err(error) => {
                metrics.renewal(Outcome::Failure);
                let remaining = store
                    .current()
                    .and_then(|c| c.not_after().duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                let wait = schedule.backoff(failures, remaining, rand::random_range(0.0..=1.0));
                failures = failures.saturating_add(1);
                warn!(
                    %error,
                    attempt = failures,
                    retry_in = ?wait,
                    valid_for = ?remaining,
                    "certificate renewal failed; the current certificate stays in use"
                );
                wait
            }
        };
        deadline = Instant::now() + wait;
    }
}

/// The certificate in use and what it was published with, so a bundle file
/// change can be applied to it.
struct Held {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    response_roots: Vec<CertificateDer<'static>>,
    file_roots: Vec<CertificateDer<'static>>,
}

impl Held {
    fn material(&self) -> Material {
        Material {
            chain: self.chain.clone(),
            key: PrivateKeyDer::Pkcs8(self.key.clone_key()),
            roots: union(&self.response_roots, &self.file_roots),
        }
    }
}

/// Resolves when the bundle file may have changed; never without a watch.
async fn bundle_changed(watch: &mut Option<FileWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// The roots in the bundle file, or why not.
fn file_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))
}

fn union(
    a: &[CertificateDer<'static>],
    b: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let mut all = a.to_vec();
    for root in b {
        if !all.contains(root) {
            all.push(root.clone());
        }
    }
    all
}

fn republish_with_file_roots(held: &mut Held, path: &Path, store: &CertStore, metrics: &Metrics) {
    let roots = match file_roots(path) {
        Ok(roots) if roots != held.file_roots => roots,
        Ok(_) => return,
        Err(error) => {
            warn!(%error, "refused the changed bundle file; the current bundle stays in use");
            return;
        }
    };
    let previous = std::mem::replace(&mut held.file_roots, roots);
    match store.publish(held.material(), SystemTime::now()) {
        Ok(configs) => {
            metrics.certificate_installed(
                configs.identity().as_str(),
                (configs.not_before(), configs.not_after()),
                configs.roots(),
            );
            info!(roots = configs.roots(), file = %path.display(), "applied the changed bundle file");
        }
        Err(error) => {
            held.file_roots = previous;
            warn!(%error, "the changed bundle file does not fit the certificate in use; keeping the current bundle");
        }
    }
}

/// Where renewals get their certificates: the control plane's identity
/// client, or a stand-in in tests.
pub trait Certifier {
    /// A fresh key certified, trusting `extra_roots` besides the bundle file.
    fn certify_trusting(
        &self,
        extra_roots: &[CertificateDer<'static>],
    ) -> impl std::future::Future<Output = Result<Credentials, CertifyError>> + Send;

    /// The bundle file to watch.
    fn bundle_file(&self) -> &Path;
}

impl Certifier for IdentityClient {
    fn certify_trusting(
        &self,
        extra_roots: &[CertificateDer<'static>],
    ) -> impl std::future::Future<Output = Result<Credentials, CertifyError>> + Send {
        IdentityClient::certify_trusting(self, extra_roots)
    }

    fn bundle_file(&self) -> &Path {
        IdentityClient::bundle_file(self)
    }
}

/// Why a renewal did not produce a certificate in use.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Certify(#[from] CertifyError),
    #[error("the control plane's certificate was refused: {0}")]
    Store(#[from] StoreError),
}

async fn renew(
    client: &impl Certifier,
    store: &CertStore,
    last_roots: &[CertificateDer<'static>],
    bundle_file: &Path,
) -> Result<(Arc<TlsConfigs>, Held, String), RenewError> {
    let creds = client.certify_trusting(last_roots).await?;
    let mut chain = Vec::with_capacity(1 + creds.intermediates.len());
    chain.push(creds.certificate.clone());
    chain.extend(creds.intermediates.iter().cloned());
    let held = Held {
        chain,
        key: PrivatePkcs8KeyDer::from(creds.key.serialize_der()),
        response_roots: creds.trust_bundle.clone(),
        // An unreadable file adds nothing; the response's bundle still applies.
        file_roots: file_roots(bundle_file).unwrap_or_default(),
    };
    let configs = store.publish(held.material(), SystemTime::now())?;
    Ok((configs, held, creds.serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_40_and_60_percent_of_the_lifetime() {
        let s = Schedule::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(s.renew_after(hour, 0.0), Duration::from_secs(1800));
        assert_eq!(s.renew_after(hour, -1.0), Duration::from_secs(1440));
        assert_eq!(s.renew_after(hour, 1.0), Duration::from_secs(2160));
        assert_eq!(
            s.renew_after(hour, 7.0),
            Duration::from_secs(2160),
            "jitter is clamped"
        );
        for j in [-1.0, -0.3, 0.0, 0.6, 1.0] {
            let at = s.renew_after(Duration::from_secs(10), j);
            assert!(
                at >= Duration::from_secs(4) && at <= Duration::from_secs(6),
                "{at:?}"
            );
        }
    }

    #[test]
    fn renewal_interval_is_clamped() {
        let s = Schedule {
            min_interval: Duration::from_secs(30),
            max_interval: Duration::from_secs(600),
            ..Schedule::default()
        };
        assert_eq!(
            s.renew_after(Duration::from_secs(10), 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            s.renew_after(Duration::from_secs(86400), 0.0),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn backoff_grows_exponentially_up_to_its_cap() {
        let s = Schedule::default();
        let long = Duration::from_secs(3600);
        let delays: Vec<Duration> = (0..10).map(|a| s.backoff(a, long, 1.0)).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[2], Duration::from_secs(2));
        assert_eq!(delays[5], Duration::from_secs(16));
        assert_eq!(delays[6], Duration::from_secs(30), "capped");
        assert_eq!(delays[9], Duration::from_secs(30));
        assert_eq!(
            s.backoff(u32::MAX, long, 1.0),
            Duration::from_secs(30),
            "no overflow"
        );
        // Full jitter over the upper half.
        assert_eq!(s.backoff(6, long, 0.0), Duration::from_secs(15));
    }

    #[test]
    fn backoff_stays_well_under_the_remaining_validity() {
        let s = Schedule::default();
        let remaining = Duration::from_secs(8);
        for attempt in 0..20 {
            assert!(s.backoff(attempt, remaining, 1.0) <= Duration::from_secs(2));
        }
        // With nothing valid left, the cap alone applies (and never below 50 ms).
        assert_eq!(s.backoff(10, Duration::ZERO, 1.0), Duration::from_secs(30));
        assert!(s.backoff(0, Duration::from_millis(10), 0.0) >= Duration::from_millis(50));
    }
}
