//! The renewal loop under paused time, with a stand-in for the control plane:
//! when it renews, how it backs off, and that backoff stays under the
//! remaining validity.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use palisade_proto::TrustDomain;
use prometheus::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    CertifyError, Credentials,
    refresh::{self, Certifier, Schedule},
};
use crate::{metrics::Metrics, tls::CertStore};

const ID: &str = "spiffe://cluster.local/ns/a/sa/app";

struct Fake {
    ca_key: KeyPair,
    ca_params: CertificateParams,
    ca_der: CertificateDer<'static>,
    lifetime: Duration,
    failures_left: AtomicU32,
    calls: Mutex<Vec<Instant>>,
    /// The validity each successful call granted, as the certificate encodes
    /// it (notAfter has whole seconds) from the moment of issue.
    granted: Mutex<Vec<Duration>>,
    bundle: PathBuf,
}

impl Fake {
    fn new(lifetime: Duration, failures: u32, bundle: PathBuf) -> Arc<Self> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_der = ca_params
            .self_signed(&ca_key)
            .expect("self-sign")
            .der()
            .clone();
        std::fs::write(
            &bundle,
            ::pem::encode(&::pem::Pem::new("CERTIFICATE", ca_der.to_vec())),
        )
        .expect("bundle");
        Arc::new(Self {
            ca_key,
            ca_params,
            ca_der,
            lifetime,
            failures_left: AtomicU32::new(failures),
            calls: Mutex::new(Vec::new()),
            granted: Mutex::new(Vec::new()),
            bundle,
        })
    }

    fn intervals(&self) -> Vec<Duration> {
        let calls = self.calls.lock().expect("lock");
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn issue(&self) -> Result<Credentials, CertifyError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ID.try_into()?)];
        let now = SystemTime::now();
        let whole_seconds = (now + self.lifetime)
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(whole_seconds);
        self.granted
            .lock()
            .expect("lock")
            .push(not_after.duration_since(now).unwrap_or_default());
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &Issuer::from_params(&self.ca_params, &self.ca_key))?;
        Ok(Credentials {
            certificate: cert.der().clone(),
            intermediates: Vec::new(),
            trust_bundle: vec![self.ca_der.clone()],
            not_after,
            serial: "00".into(),
            key,
        })
    }
}

impl Certifier for Arc<Fake> {
    fn certify_trusting(
        &self,
        _extra_roots: &[CertificateDer<'static>],
    ) -> impl std::future::Future<Output = Result<Credentials, CertifyError>> + Send {
        self.calls.lock().expect("lock").push(Instant::now());
        let fail = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let result = if fail {
            Err(CertifyError::BadResponse(
                "the control plane is down".into(),
            ))
        } else {
            self.issue()
        };
        async move { result }
    }

    fn bundle_file(&self) -> &Path {
        &self.bundle
    }
}

async fn run_for(
    fake: Arc<Fake>,
    schedule: Schedule,
    virtual_time: Duration,
) -> (Arc<Fake>, Registry) {
    let store = Arc::new(CertStore::new(
        TrustDomain::parse("cluster.local").expect("td"),
        Vec::new(),
    ));
    let registry = Registry::new();
    let metrics = Metrics::register(&registry).expect("metrics");
    let stop = CancellationToken::new();
    let task = tokio::spawn(refresh::run(
        fake.clone(),
        store,
        metrics,
        schedule,
        stop.clone(),
    ));
    tokio::time::sleep(virtual_time).await;
    stop.cancel();
    task.await.expect("loop ends on stop");
    (fake, registry)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn renewals_happen_between_40_and_60_percent_of_the_lifetime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(Duration::from_secs(100), 0, dir.path().join("bundle.pem"));
    let (fake, _) = run_for(fake, Schedule::default(), Duration::from_secs(1000)).await;
    let intervals = fake.intervals();
    assert!(
        intervals.len() >= 16,
        "about 20 renewals in 1000 s: {}",
        intervals.len()
    );
    let granted = fake.granted.lock().expect("lock").clone();
    // Each renewal comes at 40-60 % of the validity the certificate granted
    // (up to a second under the nominal 100 s: notAfter has whole seconds),
    // less the real time the loop took to read it (well under 50 ms).
    for (i, interval) in intervals.iter().enumerate() {
        let lifetime = granted[i].as_secs_f64();
        assert!(lifetime > 99.0 && lifetime <= 100.0, "granted {lifetime} s");
        let (lo, hi) = (0.4 * lifetime - 0.05, 0.6 * lifetime);
        assert!(
            (lo..=hi).contains(&secs(*interval)),
            "renewal {i} after {interval:?}, expected {lo:.2}..{hi:.2} s"
        );
    }
    let spread = intervals
        .iter()
        .map(|i| secs(*i))
        .fold((f64::MAX, 0.0_f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    assert!(
        spread.1 - spread.0 > 2.0,
        "renewals are jittered, not lock-step: {spread:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_up_to_the_cap_then_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(Duration::from_secs(100), 9, dir.path().join("bundle.pem"));
    let (fake, registry) = run_for(fake, Schedule::default(), Duration::from_secs(300)).await;
    let intervals: Vec<f64> = fake.intervals().into_iter().map(secs).collect();
    // Nothing valid yet: only the 30 s cap bounds the backoff.
    let bounds = [
        (0.25, 0.5),
        (0.5, 1.0),
        (1.0, 2.0),
        (2.0, 4.0),
        (4.0, 8.0),
        (8.0, 16.0),
        (15.0, 30.0),
        (15.0, 30.0),
        (15.0, 30.0),
    ];
    for (n, (lo, hi)) in bounds.iter().enumerate() {
        assert!(
            (*lo..=*hi).contains(&intervals[n]),
            "retry {n} after {:.3} s, expected {lo}..{hi}: {intervals:?}",
            intervals[n]
        );
    }
    // Then the tenth call succeeds and the schedule is back to 50 % ± 10 %.
    assert!((40.0..=60.0).contains(&intervals[9]), "{intervals:?}");
    let text = {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .expect("encode");
        String::from_utf8(buf).expect("utf8")
    };
    assert!(
        text.contains("palisade_cert_renewals_total{result=\"failure\"} 9"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_stays_well_under_the_remaining_validity() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A 20 s certificate: after it is issued, every retry waits at most 5 s.
    let fake = Fake::new(Duration::from_secs(20), 0, dir.path().join("bundle.pem"));
    let store = Arc::new(CertStore::new(
        TrustDomain::parse("cluster.local").expect("td"),
        Vec::new(),
    ));
    let metrics = Metrics::register(&Registry::new()).expect("metrics");
    let stop = CancellationToken::new();
    let task = tokio::spawn(refresh::run(
        fake.clone(),
        store,
        metrics,
        Schedule::default(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1)).await;
    fake.failures_left.store(8, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(120)).await;
    stop.cancel();
    task.await.expect("loop");
    let intervals = fake.intervals();
    assert!(intervals.len() >= 9, "{intervals:?}");
    for i in &intervals[1..9] {
        assert!(
            *i <= Duration::from_secs(5),
            "a retry waited {i:?} with ~20 s of validity left"
        );
    }
}
