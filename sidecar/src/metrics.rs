//! The sidecar's Prometheus metrics, registered on one [`Registry`].
//!
//! Label sets are bounded. The closed ones are the enums below
//! ([`Direction`], [`HandshakeFailure`], [`Security`], [`Flow`],
//! [`OutboundKind`], [`InboundRefusal`]), [`crate::discovery::Refusal`] and [`Outcome`]; the open ones are peer identities (as many as the mesh has
//! service accounts, and only ones a CA of the bundle vouched for) and the
//! ports of the pod's own app.

use std::time::{Duration, SystemTime};

use palisade_runtime::metrics::{Families, Family, Label};
pub use palisade_runtime::metrics::{LabelValue, Outcome};
use prometheus::{
    Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

use crate::{
    discovery::Refusal,
    policy::{Decision, Policy, Verdict},
};

/// The `reason` of a successful handshake.
pub const HANDSHAKE_OK: &str = "ok";

/// Which side of the pod a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Direction {
    /// From a peer into this pod's app.
    Inbound,
    /// From this pod's app out to a peer.
    Outbound,
}

/// Why a connection did not get through its mesh handshake: the `reason` of
/// `palisade_tls_handshakes_total{result="failure"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum HandshakeFailure {
    /// The peer's chain leads to no root of the bundle (or its signature is bad).
    UnknownCa,
    /// The peer's certificate has expired, or ours has (we fail closed).
    Expired,
    /// The peer's certificate is not valid yet: a clock is off.
    NotYetValid,
    /// The peer's certificate has no single SPIFFE ID as URI SAN.
    BadIdentity,
    /// The peer's SPIFFE ID belongs to another trust domain.
    WrongTrustDomain,
    /// The peer is not the identity this destination requires.
    UnexpectedIdentity,
    /// Another problem with the peer's certificate.
    BadCertificate,
    /// The client sent no certificate.
    NoClientCert,
    /// No common TLS version, suite or group (a TLS 1.2-only client, say).
    Incompatible,
    /// TLS without the mesh ALPN `palisade/1`, refused in strict mode.
    NoAlpn,
    /// Not TLS at all, refused in strict mode.
    Plaintext,
    /// Not a well-formed TLS handshake.
    Protocol,
    /// The peer refused our certificate with an alert.
    RejectedByPeer,
    /// The peer closed the connection during the handshake.
    Closed,
    /// The handshake, or the client's first bytes, did not arrive in time.
    Timeout,
    /// The outbound peer could not be connected to.
    Connect,
    /// This sidecar has no certificate yet (we fail closed).
    NoCertificate,
}

/// Whether a proxied connection is inside mesh TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Security {
    /// Mutually authenticated mesh TLS.
    Mtls,
    /// Relayed as it came: permissive inbound, or outbound outside the mesh.
    Plaintext,
}

/// Which way bytes move on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Flow {
    /// From the side that connected to the side that accepted.
    Request,
    /// Back.
    Response,
}

/// What discovery made of an outbound destination: the `kind` of
/// Why an inbound connection was refused before its first byte was read,
/// for `palisade_inbound_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum InboundRefusal {
    /// Its original destination is not one of the pod's own addresses: a
    /// neighbour routed a connection for another host through the pod, and
    /// relaying it would make the sidecar its proxy (SSRF, a NetworkPolicy
    /// bypass).
    ForeignDestination,
}

/// `palisade_outbound_decisions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum OutboundKind {
    /// A meshed workload: mesh TLS with its exact identity.
    Meshed,
    /// A pod without a sidecar, or a node: plain TCP.
    Unmeshed,
    /// A Service's cluster address: one of its endpoints, mesh TLS or plain
    /// TCP by what that endpoint is.
    Service,
    /// An address discovery does not know: plain TCP.
    Unknown,
    /// Refused before a byte was sent.
    Refused,
}

/// How much the destination table holds, for `palisade_discovery_*_known`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Known {
    pub addresses: usize,
    pub services: usize,
}

/// All sidecar metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    handshakes: IntCounterVec,
    handshake_duration: HistogramVec,
    opened: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    authz: IntCounterVec,
    policy_info: IntGaugeVec,
    connections_revoked: IntCounter,
    cert_expiration: GaugeVec,
    cert_not_before: GaugeVec,
    renewals: IntCounterVec,
    bundle_roots: IntGauge,
    decisions: IntCounterVec,
    refusals: IntCounterVec,
    inbound_refusals: IntCounterVec,
    endpoint_failures: IntCounter,
    stream_connected: IntGauge,
    stream_opens: IntCounterVec,
    snapshot_time: Gauge,
    addresses_known: IntGauge,
    services_known: IntGauge,
    updates: IntCounterVec,
}

/// Byte counters of one direction, resolved once per connection.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    /// Bytes from the connecting side to the accepting side.
    pub request: IntCounter,
    /// Bytes back.
    pub response: IntCounter,
}

/// Decrements `palisade_connections_active` when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(IntGauge);

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        Self::build(registry).map(|(metrics, _)| metrics)
    }

    /// Every family the sidecar registers, with its labels and their values.
    pub fn describe() -> Result<Vec<Family>, prometheus::Error> {
        Self::build(&Registry::new()).map(|(_, families)| families)
    }

    fn build(registry: &Registry) -> Result<(Self, Vec<Family>), prometheus::Error> {
        let mut f = Families::new(registry);
        let reasons = std::iter::once(HANDSHAKE_OK)
            .chain(HandshakeFailure::names())
            .collect();
        let handshakes = f.counter_vec(
            "palisade_tls_handshakes_total",
            "Mesh TLS handshakes, by direction, result and reason.",
            vec![
                Label::closed::<Direction>("direction"),
                Label::closed::<Outcome>("result"),
                Label::closed_with("reason", reasons),
            ],
        )?;
        let handshake_duration = f.histogram_vec(
            "palisade_tls_handshake_duration_seconds",
            "Duration of successful mesh TLS handshakes.",
            vec![Label::closed::<Direction>("direction")],
            vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ],
        )?;
        let opened = f.counter_vec(
            "palisade_connections_opened_total",
            "Connections proxied, by direction, security (mtls or plaintext) and peer identity.",
            vec![
                Label::closed::<Direction>("direction"),
                Label::closed::<Security>("security"),
                Label::open("peer_identity"),
            ],
        )?;
        let active = f.int_gauge_vec(
            "palisade_connections_active",
            "Connections being proxied now.",
            vec![Label::closed::<Direction>("direction")],
        )?;
        let bytes = f.counter_vec(
            "palisade_bytes_total",
            "Bytes proxied, by direction and flow (request: from the connecting side; response: back).",
            vec![
                Label::closed::<Direction>("direction"),
                Label::closed::<Flow>("flow"),
            ],
        )?;
        let authz = f.counter_vec(
            "palisade_authz_decisions_total",
            "Inbound connections judged by the authorization policy, by decision (allow, deny, audit_deny), app port (declared or in a rule, else other) and the policy that decided.",
            vec![
                Label::closed::<Verdict>("decision"),
                Label::open("port"),
                Label::open("policy"),
            ],
        )?;
        let policy_info = f.int_gauge_vec(
            "palisade_policy_info",
            "1 for the authorization policy in force: its source (file, mesh-default, kubernetes) and version.",
            vec![Label::open("source"), Label::open("version")],
        )?;
        let connections_revoked = f.int_counter(
            "palisade_connections_revoked_total",
            "Established connections closed because the deny list came to name their peer.",
        )?;
        let cert_expiration = f.gauge_vec(
            "palisade_cert_expiration_timestamp_seconds",
            "When the sidecar's current certificate expires (Unix time).",
            vec![Label::open("identity")],
        )?;
        let cert_not_before = f.gauge_vec(
            "palisade_cert_not_before_timestamp_seconds",
            "notBefore of the certificate in use (Unix time); with the expiration, its lifetime.",
            vec![Label::open("identity")],
        )?;
        let renewals = f.counter_vec(
            "palisade_cert_renewals_total",
            "Attempts to install a new certificate, by result.",
            vec![Label::closed::<Outcome>("result")],
        )?;
        let bundle_roots = f.int_gauge(
            "palisade_trust_bundle_roots",
            "Roots in the trust bundle in use.",
        )?;
        let decisions = f.counter_vec(
            "palisade_outbound_decisions_total",
            "Outbound connections by what discovery made of the destination (meshed, unmeshed, unknown, refused).",
            vec![Label::closed::<OutboundKind>("kind")],
        )?;
        let refusals = f.counter_vec(
            "palisade_outbound_refusals_total",
            "Outbound connections refused before a byte was sent, by reason.",
            vec![Label::closed::<Refusal>("reason")],
        )?;
        let inbound_refusals = f.counter_vec(
            "palisade_inbound_refusals_total",
            "Inbound connections refused before a byte was read, by reason.",
            vec![Label::closed::<InboundRefusal>("reason")],
        )?;
        let endpoint_failures = f.int_counter(
            "palisade_outbound_endpoint_failures_total",
            "Service endpoints that refused or did not answer a connect, each then passed over for 5 s while another is up.",
        )?;
        let stream_connected = f.int_gauge(
            "palisade_discovery_stream_connected",
            "1 while the discovery stream to the control plane is open and has delivered its snapshot, else 0.",
        )?;
        let stream_opens = f.counter_vec(
            "palisade_discovery_stream_opens_total",
            "Attempts to open the discovery stream, by result.",
            vec![Label::closed::<Outcome>("result")],
        )?;
        let snapshot_time = f.gauge(
            "palisade_discovery_snapshot_timestamp_seconds",
            "When the last discovery snapshot was applied (Unix time; 0 before the first). Its age is time() minus this.",
        )?;
        let addresses_known = f.int_gauge(
            "palisade_discovery_addresses_known",
            "Addresses discovery has told this sidecar about (workloads known).",
        )?;
        let services_known = f.int_gauge(
            "palisade_discovery_services_known",
            "Service cluster addresses discovery has told this sidecar about.",
        )?;
        let updates = f.counter_vec(
            "palisade_discovery_updates_total",
            "Discovery messages (snapshots and changes), by result: applied, or refused whole.",
            vec![Label::closed::<Outcome>("result")],
        )?;

        // Present from the start, so increase() and absence checks see a zero.
        for result in Outcome::ALL {
            renewals.with_label_values(&[result.as_str()]);
            stream_opens.with_label_values(&[result.as_str()]);
            updates.with_label_values(&[result.as_str()]);
        }
        for kind in OutboundKind::ALL {
            decisions.with_label_values(&[kind.as_str()]);
        }
        for reason in Refusal::ALL {
            refusals.with_label_values(&[reason.as_str()]);
        }
        for reason in InboundRefusal::ALL {
            inbound_refusals.with_label_values(&[reason.as_str()]);
        }
        for d in Direction::ALL {
            let d = d.as_str();
            active.with_label_values(&[d]);
            handshakes.with_label_values(&[d, Outcome::Success.as_str(), HANDSHAKE_OK]);
            for reason in HandshakeFailure::ALL {
                handshakes.with_label_values(&[d, Outcome::Failure.as_str(), reason.as_str()]);
            }
            handshake_duration.with_label_values(&[d]);
            opened.with_label_values(&[d, Security::Plaintext.as_str(), ""]);
            for flow in Flow::ALL {
                bytes.with_label_values(&[d, flow.as_str()]);
            }
        }
        let metrics = Self {
            handshakes,
            handshake_duration,
            opened,
            active,
            bytes,
            authz,
            policy_info,
            connections_revoked,
            cert_expiration,
            cert_not_before,
            renewals,
            bundle_roots,
            decisions,
            refusals,
            inbound_refusals,
            endpoint_failures,
            stream_connected,
            stream_opens,
            snapshot_time,
            addresses_known,
            services_known,
            updates,
        };
        Ok((metrics, f.into_described()))
    }

    /// Counts how a handshake ended; a success also records its duration.
    /// Called from one place only, `proxy::handshake`.
    pub fn handshake(&self, direction: Direction, outcome: Result<Duration, HandshakeFailure>) {
        let d = direction.as_str();
        match outcome {
            Ok(took) => {
                self.handshakes
                    .with_label_values(&[d, Outcome::Success.as_str(), HANDSHAKE_OK])
                    .inc();
                self.handshake_duration
                    .with_label_values(&[d])
                    .observe(took.as_secs_f64());
            }
            Err(reason) => self
                .handshakes
                .with_label_values(&[d, Outcome::Failure.as_str(), reason.as_str()])
                .inc(),
        }
    }

    /// Counts an opened connection; the returned guard keeps it active.
    pub fn opened(&self, direction: Direction, security: Security, peer: &str) -> ActiveGuard {
        self.opened
            .with_label_values(&[direction.as_str(), security.as_str(), peer])
            .inc();
        let gauge = self.active.with_label_values(&[direction.as_str()]);
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// The byte counters of `direction`.
    pub fn bytes(&self, direction: Direction) -> ByteCounters {
        let counter = |flow: Flow| {
            self.bytes
                .with_label_values(&[direction.as_str(), flow.as_str()])
        };
        ByteCounters {
            request: counter(Flow::Request),
            response: counter(Flow::Response),
        }
    }

    /// Counts an authorization decision; `port` is `None` for `other`.
    pub fn authz(&self, decision: &Decision, port: Option<u16>) {
        let port = match port {
            Some(p) => p.to_string(),
            None => String::from("other"),
        };
        self.authz
            .with_label_values(&[decision.verdict.as_str(), &port, &decision.policy])
            .inc();
    }

    /// Records the policy now in force.
    pub fn policy_in_force(&self, policy: &Policy) {
        self.policy_info.reset();
        let source: &'static str = policy.source().into();
        self.policy_info
            .with_label_values(&[source, policy.version()])
            .set(1);
    }

    /// Counts a connection closed by the deny list.
    pub fn connection_revoked(&self) {
        self.connections_revoked.inc();
    }

    /// Records the certificate now in use.
    pub fn certificate_installed(
        &self,
        identity: &str,
        (not_before, not_after): (SystemTime, SystemTime),
        roots: usize,
    ) {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default()
        };
        // One identity per sidecar: a changed identity replaces the old series.
        self.cert_expiration.reset();
        self.cert_expiration
            .with_label_values(&[identity])
            .set(unix(not_after));
        self.cert_not_before.reset();
        self.cert_not_before
            .with_label_values(&[identity])
            .set(unix(not_before));
        self.bundle_roots
            .set(i64::try_from(roots).unwrap_or(i64::MAX));
    }

    /// Counts an attempt to install a new certificate.
    pub fn renewal(&self, result: Outcome) {
        self.renewals.with_label_values(&[result.as_str()]).inc();
    }

    /// Counts what became of an outbound connection after discovery.
    pub fn outbound_decision(&self, kind: OutboundKind) {
        self.decisions.with_label_values(&[kind.as_str()]).inc();
    }

    /// Counts an outbound connection refused before a byte was sent.
    pub fn outbound_refused(&self, reason: Refusal) {
        self.outbound_decision(OutboundKind::Refused);
        self.refusals.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts an inbound connection refused before a byte was read.
    pub fn inbound_refused(&self, reason: InboundRefusal) {
        self.inbound_refusals
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a Service endpoint that refused or did not answer a connect.
    pub fn endpoint_failed(&self) {
        self.endpoint_failures.inc();
    }

    /// Counts a Service connection none of whose endpoints answered; its
    /// decision was counted as `service` already.
    pub fn endpoints_unreachable(&self) {
        self.refusals
            .with_label_values(&[Refusal::EndpointsUnreachable.as_str()])
            .inc();
    }

    /// Counts an attempt to open the discovery stream.
    pub fn stream_open(&self, result: Outcome) {
        self.stream_opens
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Whether the discovery stream is open and synced.
    pub fn stream_connected(&self, connected: bool) {
        self.stream_connected.set(i64::from(connected));
    }

    /// Counts a discovery message; `known` is the address count after it,
    /// and `snapshot` whether it was one (applied at `now`).
    pub fn discovery_update(&self, result: Outcome, snapshot: bool, known: Known) {
        self.updates.with_label_values(&[result.as_str()]).inc();
        if result == Outcome::Success {
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.addresses_known.set(count(known.addresses));
            self.services_known.set(count(known.services));
            if snapshot {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default();
                self.snapshot_time.set(now);
            }
        }
    }
}

// === impl ActiveGuard ===

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_the_documented_spellings() {
        // These strings are in alert rules and dashboards: a rename is a
        // breaking change, not a refactoring.
        assert_eq!(
            HandshakeFailure::names(),
            [
                "unknown_ca",
                "expired",
                "not_yet_valid",
                "bad_identity",
                "wrong_trust_domain",
                "unexpected_identity",
                "bad_certificate",
                "no_client_cert",
                "incompatible",
                "no_alpn",
                "plaintext",
                "protocol",
                "rejected_by_peer",
                "closed",
                "timeout",
                "connect",
                "no_certificate",
            ]
        );
        assert_eq!(Direction::names(), ["inbound", "outbound"]);
        assert_eq!(Security::names(), ["mtls", "plaintext"]);
        assert_eq!(Flow::names(), ["request", "response"]);
        assert_eq!(InboundRefusal::names(), ["foreign_destination"]);
        assert_eq!(
            OutboundKind::names(),
            ["meshed", "unmeshed", "service", "unknown", "refused"]
        );
        assert_eq!(
            Refusal::names(),
            [
                "conflict",
                "unidentifiable",
                "strict_unmeshed",
                "strict_unknown",
                "not_synced",
                "no_endpoints",
                "no_service_port",
                "endpoints_unreachable"
            ]
        );
    }

    #[test]
    fn every_series_at_start_uses_values_of_its_closed_sets() {
        let registry = Registry::new();
        let _metrics = Metrics::register(&registry).expect("metrics");
        let families = Metrics::describe().expect("metrics");
        let gathered = registry.gather();
        for family in &families {
            let Some(found) = gathered.iter().find(|g| g.name() == family.name) else {
                continue;
            };
            for series in found.get_metric() {
                for pair in series.get_label() {
                    let label = family
                        .labels
                        .iter()
                        .find(|l| l.name == pair.name())
                        .expect("a described label");
                    if let Some(values) = &label.values {
                        assert!(
                            values.contains(&pair.value()),
                            "{}{{{}={:?}}} is not in the label's closed set",
                            family.name,
                            label.name,
                            pair.value()
                        );
                    }
                }
            }
        }
        // Every failure reason is there from the start, in both directions.
        let handshakes = gathered
            .iter()
            .find(|g| g.name() == "palisade_tls_handshakes_total")
            .expect("handshakes start at zero");
        assert_eq!(
            handshakes.get_metric().len(),
            2 * (1 + HandshakeFailure::ALL.len())
        );
    }
}
