//! The control plane's Prometheus metrics, registered on one [`Registry`].
//!
//! Every label is a closed set, an enum of the module that decides it:
//! [`crate::service::Reason`], [`crate::authn::Reason`] and
//! [`crate::authn::Kind`], [`crate::inject::ReviewResult`] and
//! [`crate::inject::ReviewReason`], [`crate::publish::Target`],
//! [`ReloadSource`], [`StreamRefusal`], [`StreamEnd`] and [`Outcome`].

use std::time::{Duration, SystemTime};

use palisade_runtime::metrics::{Families, Family, Label};
pub use palisade_runtime::metrics::{LabelValue, Outcome};
use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::{
    authn,
    discovery::Discovery,
    inject::{ReviewReason, ReviewResult},
    publish, service,
};

/// The `reason` of a certificate issued.
pub const ISSUED_OK: &str = "ok";

/// Which watched file was reloaded: the `source` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ReloadSource {
    /// The CA directory (issuer, key, bundle).
    Issuer,
    /// The `static` authenticator's token file.
    StaticTokens,
    /// The webhook's injection configuration.
    InjectionConfig,
    /// The `file` discovery source.
    DiscoveryFile,
}

/// Why a discovery stream was refused: the `reason` label.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray, strum::Display,
)]
#[strum(serialize_all = "snake_case")]
pub enum StreamRefusal {
    /// No verified mesh client certificate.
    NoClientCert,
    /// The sources have not delivered a complete state yet.
    NotSynced,
    /// No live pod has the caller's address.
    NoPod,
    /// More than one live pod has the caller's address.
    Contested,
    /// The pod at the caller's address is not a meshed workload of the
    /// certificate's identity.
    OtherIdentity,
    /// The certificate expired after the connection opened.
    CertificateExpired,
}

/// Why a discovery stream ended: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum StreamEnd {
    /// The caller went away (or its connection did).
    Closed,
    /// The caller's pod is gone from its address.
    Unbound,
    /// The client certificate expired; the caller reconnects with its new one.
    CertificateExpired,
    /// The control plane is shutting down.
    Shutdown,
}

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
    streams_active: IntGauge,
    streams_refused: IntCounterVec,
    streams_ended: IntCounterVec,
    stream_updates: IntCounter,
    stream_resyncs: IntCounter,
    source_synced: IntGauge,
    source_workloads: IntGauge,
    source_addresses: IntGauge,
    source_services: IntGauge,
    policy_resources: IntGaugeVec,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        Self::build(registry).map(|(metrics, _)| metrics)
    }

    /// Every family the control plane registers, with its labels and their values.
    pub fn describe() -> Result<Vec<Family>, prometheus::Error> {
        Self::build(&Registry::new()).map(|(_, families)| families)
    }

    fn build(registry: &Registry) -> Result<(Self, Vec<Family>), prometheus::Error> {
        let mut f = Families::new(registry);
        let issue_reasons = std::iter::once(ISSUED_OK)
            .chain(service::Reason::names())
            .collect();
        let issued = f.counter_vec(
            "palisade_ca_certificates_issued_total",
            "Certify requests answered, by result (success or failure) and reason.",
            vec![
                Label::closed::<Outcome>("result"),
                Label::closed_with("reason", issue_reasons),
            ],
        )?;
        let issue_duration = f.histogram(
            "palisade_ca_issue_duration_seconds",
            "Time to answer a Certify request: authentication, CSR checks and signing.",
            vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?;
        let issuer_expiration = f.gauge(
            "palisade_ca_issuer_expiration_timestamp_seconds",
            "When the current issuer certificate expires (Unix time).",
        )?;
        let bundle_roots = f.int_gauge(
            "palisade_ca_trust_bundle_roots",
            "Roots in the trust bundle the control plane hands out.",
        )?;
        let authn_failures = f.counter_vec(
            "palisade_ca_authentication_failures_total",
            "Certify requests whose token did not authenticate, by authenticator and reason.",
            vec![
                Label::closed::<authn::Kind>("authenticator"),
                Label::closed::<authn::Reason>("reason"),
            ],
        )?;
        let reloads = f.counter_vec(
            "palisade_ca_reloads_total",
            "Reloads of watched files, by source (issuer, static_tokens) and result.",
            vec![
                Label::closed::<ReloadSource>("source"),
                Label::closed::<Outcome>("result"),
            ],
        )?;
        let reviews = f.counter_vec(
            "palisade_webhook_reviews_total",
            "AdmissionReviews answered by the injection webhook, by result (injected, skipped, denied, invalid) and reason.",
            vec![
                Label::closed::<ReviewResult>("result"),
                Label::closed::<ReviewReason>("reason"),
            ],
        )?;
        let review_duration = f.histogram(
            "palisade_webhook_review_duration_seconds",
            "Time to answer one AdmissionReview, from the parsed body to the response.",
            vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05],
        )?;
        let publications = f.counter_vec(
            "palisade_bundle_publications_total",
            "Writes of the trust bundle into the cluster, by target (webhook_ca_bundle, configmap) and result.",
            vec![
                Label::closed::<publish::Target>("target"),
                Label::closed::<Outcome>("result"),
            ],
        )?;
        let streams_active = f.int_gauge(
            "palisade_discovery_streams_active",
            "Discovery streams open to sidecars.",
        )?;
        let streams_refused = f.counter_vec(
            "palisade_discovery_streams_refused_total",
            "Discovery streams refused, by reason (no_client_cert, not_synced, no_pod, contested, other_identity, certificate_expired).",
            vec![Label::closed::<StreamRefusal>("reason")],
        )?;
        let streams_ended = f.counter_vec(
            "palisade_discovery_streams_ended_total",
            "Discovery streams ended, by reason (closed, unbound, certificate_expired, shutdown).",
            vec![Label::closed::<StreamEnd>("reason")],
        )?;
        let stream_updates = f.int_counter(
            "palisade_discovery_updates_sent_total",
            "Batches of changes sent on discovery streams (snapshots not included).",
        )?;
        let stream_resyncs = f.int_counter(
            "palisade_discovery_resyncs_total",
            "Fresh snapshots sent to streams that fell behind the changes.",
        )?;
        let source_synced = f.int_gauge(
            "palisade_discovery_source_synced",
            "1 once the discovery source has delivered a complete state, else 0.",
        )?;
        let source_workloads = f.int_gauge(
            "palisade_discovery_source_workloads",
            "Live workloads (pods, or the file's entries) the discovery source knows.",
        )?;
        let source_addresses = f.int_gauge(
            "palisade_discovery_source_addresses",
            "Addresses discovery answers for (meshed, unmeshed or failing closed).",
        )?;
        let source_services = f.int_gauge(
            "palisade_discovery_source_services",
            "Service cluster addresses discovery answers for.",
        )?;
        let policy_resources = f.int_gauge_vec(
            "palisade_policy_resources",
            "Policy resources discovery knows, by kind (inbound_policy, identity_deny_list).",
            vec![Label::closed_with(
                "kind",
                vec!["inbound_policy", "identity_deny_list"],
            )],
        )?;

        // Present from the start, so rate() and absence alerts work before the first request.
        issued.with_label_values(&[Outcome::Success.as_str(), ISSUED_OK]);
        for reason in service::Reason::ALL {
            issued.with_label_values(&[Outcome::Failure.as_str(), reason.as_str()]);
        }
        for reason in StreamRefusal::ALL {
            streams_refused.with_label_values(&[reason.as_str()]);
        }
        for reason in StreamEnd::ALL {
            streams_ended.with_label_values(&[reason.as_str()]);
        }
        let metrics = Self {
            streams_active,
            streams_refused,
            streams_ended,
            stream_updates,
            stream_resyncs,
            source_synced,
            source_workloads,
            source_addresses,
            source_services,
            policy_resources,
            issued,
            issue_duration,
            issuer_expiration,
            bundle_roots,
            authn_failures,
            reloads,
            reviews,
            review_duration,
            publications,
        };
        Ok((metrics, f.into_described()))
    }

    /// Counts a Certify answer and its duration.
    pub fn issue_finished(&self, outcome: Result<(), service::Reason>, elapsed: Duration) {
        let (result, reason) = match outcome {
            Ok(()) => (Outcome::Success, ISSUED_OK),
            Err(reason) => (Outcome::Failure, reason.as_str()),
        };
        self.issued
            .with_label_values(&[result.as_str(), reason])
            .inc();
        self.issue_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a token that did not authenticate.
    pub fn authn_failed(&self, authenticator: authn::Kind, reason: authn::Reason) {
        self.authn_failures
            .with_label_values(&[authenticator.as_str(), reason.as_str()])
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
    pub fn reloaded(&self, source: ReloadSource, result: Outcome) {
        self.reloads
            .with_label_values(&[source.as_str(), result.as_str()])
            .inc();
    }

    /// Counts an answered AdmissionReview and its duration.
    pub fn review_finished(&self, result: ReviewResult, reason: ReviewReason, elapsed: Duration) {
        self.reviews
            .with_label_values(&[result.as_str(), reason.as_str()])
            .inc();
        self.review_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a write of the trust bundle into the cluster.
    pub fn published(&self, target: publish::Target, result: Outcome) {
        self.publications
            .with_label_values(&[target.as_str(), result.as_str()])
            .inc();
    }

    /// Starts the authentication-failure counters of `authenticator` at zero
    /// for every reason, so rate() and alerts see them before the first failure.
    pub fn authenticator_ready(&self, authenticator: authn::Kind) {
        for reason in authn::Reason::ALL {
            self.authn_failures
                .with_label_values(&[authenticator.as_str(), reason.as_str()]);
        }
    }

    /// Starts the reload counters of a watched file at zero, so its family is
    /// there (and `increase()` sees the first failure) before any reload.
    pub fn watching(&self, source: ReloadSource) {
        for result in Outcome::ALL {
            self.reloads
                .with_label_values(&[source.as_str(), result.as_str()]);
        }
    }

    /// Starts the publication counters of a configured target at zero.
    pub fn publishing(&self, target: publish::Target) {
        for result in Outcome::ALL {
            self.publications
                .with_label_values(&[target.as_str(), result.as_str()]);
        }
    }

    /// Starts the webhook's counters at zero: every result each reason can
    /// be counted under.
    pub fn webhook_ready(&self) {
        for reason in ReviewReason::ALL {
            for result in reason.results() {
                self.reviews
                    .with_label_values(&[result.as_str(), reason.as_str()]);
            }
        }
    }

    /// Counts a discovery stream that opened; the gauge falls when the
    /// returned guard is dropped.
    pub fn stream_opened(&self) -> ActiveStream {
        self.streams_active.inc();
        ActiveStream(self.streams_active.clone())
    }

    /// Counts a discovery stream refused.
    pub fn stream_refused(&self, reason: StreamRefusal) {
        self.streams_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a discovery stream that ended.
    pub fn stream_ended(&self, reason: StreamEnd) {
        self.streams_ended
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a batch of changes sent on a stream.
    pub fn update_sent(&self) {
        self.stream_updates.inc();
    }

    /// Counts a fresh snapshot sent to a stream that fell behind.
    pub fn stream_resynced(&self) {
        self.stream_resyncs.inc();
    }

    /// Records what the discovery source knows now.
    pub fn discovery_known(&self, discovery: &Discovery) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.source_synced.set(i64::from(discovery.is_synced()));
        self.source_workloads.set(count(discovery.workloads()));
        self.source_addresses.set(count(discovery.addresses()));
        self.source_services.set(count(discovery.services()));
        let (policies, deny_lists) = discovery.policy_resources();
        self.policy_resources
            .with_label_values(&["inbound_policy"])
            .set(count(policies));
        self.policy_resources
            .with_label_values(&["identity_deny_list"])
            .set(count(deny_lists));
    }
}

/// One open discovery stream, counted in `palisade_discovery_streams_active`.
#[derive(Debug)]
pub struct ActiveStream(IntGauge);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}
