//! The control plane's Prometheus metrics, registered on one [`Registry`].

use std::time::{Duration, SystemTime};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, core::Collector,
};

/// Counters and gauges of the CA and its authenticators.
#[derive(Clone, Debug)]
pub struct Metrics {
    issued: IntCounterVec,
    issue_duration: Histogram,
    issuer_expiration: Gauge,
    bundle_roots: IntGauge,
    authn_failures: IntCounterVec,
    reloads: IntCounterVec,
    reviews: IntCounterVec,
    review_duration: Histogram,
    publications: IntCounterVec,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let issued = IntCounterVec::new(
            Opts::new(
                "palisade_ca_certificates_issued_total",
                "Certify requests answered, by result (success or failure) and reason.",
            ),
            &["result", "reason"],
        )?;
        let issue_duration = Histogram::with_opts(
            HistogramOpts::new(
                "palisade_ca_issue_duration_seconds",
                "Time to answer a Certify request: authentication, CSR checks and signing.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let issuer_expiration = Gauge::new(
            "palisade_ca_issuer_expiration_timestamp_seconds",
            "When the current issuer certificate expires (Unix time).",
        )?;
        let bundle_roots = IntGauge::new(
            "palisade_ca_trust_bundle_roots",
            "Roots in the trust bundle the control plane hands out.",
        )?;
        let authn_failures = IntCounterVec::new(
            Opts::new(
                "palisade_ca_authentication_failures_total",
                "Certify requests whose token did not authenticate, by authenticator and reason.",
            ),
            &["authenticator", "reason"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "palisade_ca_reloads_total",
                "Reloads of watched files, by source (issuer, static_tokens) and result.",
            ),
            &["source", "result"],
        )?;
        let reviews = IntCounterVec::new(
            Opts::new(
                "palisade_webhook_reviews_total",
                "AdmissionReviews answered by the injection webhook, by result (injected, skipped, denied, invalid) and reason.",
            ),
            &["result", "reason"],
        )?;
        let review_duration = Histogram::with_opts(
            HistogramOpts::new(
                "palisade_webhook_review_duration_seconds",
                "Time to answer one AdmissionReview, from the parsed body to the response.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
            ]),
        )?;
        let publications = IntCounterVec::new(
            Opts::new(
                "palisade_bundle_publications_total",
                "Writes of the trust bundle into the cluster, by target (webhook_ca_bundle, configmap) and result.",
            ),
            &["target", "result"],
        )?;
        let collectors: [Box<dyn Collector>; 9] = [
            Box::new(issued.clone()),
            Box::new(issue_duration.clone()),
            Box::new(issuer_expiration.clone()),
            Box::new(bundle_roots.clone()),
            Box::new(authn_failures.clone()),
            Box::new(reloads.clone()),
            Box::new(reviews.clone()),
            Box::new(review_duration.clone()),
            Box::new(publications.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        // Present from the start, so rate() and absence alerts work before the first request.
        issued.with_label_values(&["success", "ok"]);
        Ok(Self {
            issued,
            issue_duration,
            issuer_expiration,
            bundle_roots,
            authn_failures,
            reloads,
            reviews,
            review_duration,
            publications,
        })
    }

    /// Counts a Certify answer and its duration.
    pub fn issue_finished(&self, reason: Result<(), &'static str>, elapsed: Duration) {
        match reason {
            Ok(()) => self.issued.with_label_values(&["success", "ok"]).inc(),
            Err(reason) => self.issued.with_label_values(&["failure", reason]).inc(),
        }
        self.issue_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a token that did not authenticate.
    pub fn authn_failed(&self, authenticator: &'static str, reason: &'static str) {
        self.authn_failures
            .with_label_values(&[authenticator, reason])
            .inc();
    }

    /// Records the issuer now in use.
    pub fn issuer_loaded(&self, not_after: SystemTime, bundle_roots: usize) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.issuer_expiration.set(secs);
        self.bundle_roots
            .set(i64::try_from(bundle_roots).unwrap_or(i64::MAX));
    }

    /// Counts a reload of a watched file.
    pub fn reloaded(&self, source: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.with_label_values(&[source, result]).inc();
    }

    /// Counts an answered AdmissionReview and its duration.
    pub fn review_finished(&self, result: &'static str, reason: &'static str, elapsed: Duration) {
        self.reviews.with_label_values(&[result, reason]).inc();
        self.review_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a write of the trust bundle into the cluster.
    pub fn published(&self, target: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.publications.with_label_values(&[target, result]).inc();
    }

    /// Starts the authentication-failure counters of `authenticator` at zero
    /// for every reason, so rate() and alerts see them before the first failure.
    pub fn authenticator_ready(&self, authenticator: &'static str, reasons: &[&'static str]) {
        for reason in reasons {
            self.authn_failures
                .with_label_values(&[authenticator, reason]);
        }
    }

    /// Starts the webhook's counter of injected pods at zero.
    pub fn webhook_ready(&self) {
        self.reviews.with_label_values(&["injected", "injected"]);
    }
}
