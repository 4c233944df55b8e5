//! The sidecar's Prometheus metrics, registered on one [`Registry`].
//!
//! Label sets are bounded: `direction` (inbound/outbound), `result`
//! (success/failure), `reason` (a closed set, see [`crate::tls::failure_reason`]),
//! `security` (mtls/plaintext), `flow` (request/response), and peer identities,
//! which are as many as the mesh has service accounts.

use std::time::{Duration, SystemTime};

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

/// Which side of the pod a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From a peer into this pod's app.
    Inbound,
    /// From this pod's app out to a peer.
    Outbound,
}

/// All sidecar metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    handshakes: IntCounterVec,
    handshake_duration: HistogramVec,
    opened: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    authz_denied: IntCounterVec,
    cert_expiration: GaugeVec,
    cert_not_before: GaugeVec,
    renewals: IntCounterVec,
    bundle_roots: IntGauge,
}

/// Byte counters of one direction, resolved once per connection.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    /// Bytes from the connecting side to the accepting side.
    pub request: IntCounter,
    /// Bytes back.
    pub response: IntCounter,
}

// === impl Direction ===

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "palisade_tls_handshakes_total",
                "Mesh TLS handshakes, by direction, result and reason.",
            ),
            &["direction", "result", "reason"],
        )?;
        let handshake_duration = HistogramVec::new(
            HistogramOpts::new(
                "palisade_tls_handshake_duration_seconds",
                "Duration of successful mesh TLS handshakes.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["direction"],
        )?;
        let opened = IntCounterVec::new(
            Opts::new(
                "palisade_connections_opened_total",
                "Connections proxied, by direction, security (mtls or plaintext) and peer identity.",
            ),
            &["direction", "security", "peer_identity"],
        )?;
        let active = IntGaugeVec::new(
            Opts::new(
                "palisade_connections_active",
                "Connections being proxied now.",
            ),
            &["direction"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "palisade_bytes_total",
                "Bytes proxied, by direction and flow (request: from the connecting side; response: back).",
            ),
            &["direction", "flow"],
        )?;
        let authz_denied = IntCounterVec::new(
            Opts::new(
                "palisade_authz_denied_total",
                "Inbound connections refused by the authorization policy.",
            ),
            &["port", "peer_identity"],
        )?;
        let cert_expiration = GaugeVec::new(
            Opts::new(
                "palisade_cert_expiration_timestamp_seconds",
                "When the sidecar's current certificate expires (Unix time).",
            ),
            &["identity"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "palisade_cert_renewals_total",
                "Attempts to install a new certificate, by result.",
            ),
            &["result"],
        )?;
        let bundle_roots = IntGauge::new(
            "palisade_trust_bundle_roots",
            "Roots in the trust bundle in use.",
        )?;
        let cert_not_before = GaugeVec::new(
            Opts::new(
                "palisade_cert_not_before_timestamp_seconds",
                "notBefore of the certificate in use (Unix time); with the expiration, its lifetime.",
            ),
            &["identity"],
        )?;
        let collectors: [Box<dyn Collector>; 10] = [
            Box::new(handshakes.clone()),
            Box::new(handshake_duration.clone()),
            Box::new(opened.clone()),
            Box::new(active.clone()),
            Box::new(bytes.clone()),
            Box::new(authz_denied.clone()),
            Box::new(cert_expiration.clone()),
            Box::new(cert_not_before.clone()),
            Box::new(renewals.clone()),
            Box::new(bundle_roots.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        // Present from the start, so increase() and absence checks see a zero.
        for result in ["success", "failure"] {
            renewals.with_label_values(&[result]);
        }
        for d in [Direction::Inbound, Direction::Outbound] {
            active.with_label_values(&[d.as_str()]);
            handshakes.with_label_values(&[d.as_str(), "success", "ok"]);
            handshake_duration.with_label_values(&[d.as_str()]);
            opened.with_label_values(&[d.as_str(), "plaintext", ""]);
            for flow in ["request", "response"] {
                bytes.with_label_values(&[d.as_str(), flow]);
            }
        }
        Ok(Self {
            handshakes,
            handshake_duration,
            opened,
            active,
            bytes,
            authz_denied,
            cert_expiration,
            cert_not_before,
            renewals,
            bundle_roots,
        })
    }

    /// Counts a successful handshake and its duration.
    pub fn handshake_ok(&self, direction: Direction, elapsed: Duration) {
        self.handshakes
            .with_label_values(&[direction.as_str(), "success", "ok"])
            .inc();
        self.handshake_duration
            .with_label_values(&[direction.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, direction: Direction, reason: &'static str) {
        self.handshakes
            .with_label_values(&[direction.as_str(), "failure", reason])
            .inc();
    }

    /// Counts an opened connection; the returned guard keeps it active.
    pub fn opened(&self, direction: Direction, mtls: bool, peer: &str) -> ActiveGuard {
        let security = if mtls { "mtls" } else { "plaintext" };
        self.opened
            .with_label_values(&[direction.as_str(), security, peer])
            .inc();
        let gauge = self.active.with_label_values(&[direction.as_str()]);
        gauge.inc();
        ActiveGuard(gauge)
    }

    /// The byte counters of `direction`.
    pub fn bytes(&self, direction: Direction) -> ByteCounters {
        ByteCounters {
            request: self
                .bytes
                .with_label_values(&[direction.as_str(), "request"]),
            response: self
                .bytes
                .with_label_values(&[direction.as_str(), "response"]),
        }
    }

    /// Counts an authorization denial.
    pub fn authz_denied(&self, port: u16, peer: &str) {
        self.authz_denied
            .with_label_values(&[&port.to_string(), peer])
            .inc();
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
    pub fn renewal(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.renewals.with_label_values(&[result]).inc();
    }
}

/// Decrements `palisade_connections_active` when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
