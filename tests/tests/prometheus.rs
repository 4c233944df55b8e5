//! The metrics through a real Prometheus (Debian's `prometheus`, started by
//! the test on loopback with a scrape configuration it writes): a control
//! plane and two sidecars are scraped while the test makes good and bad
//! connections, and what Prometheus answers over its HTTP API must equal what
//! the test did. The shipped alert rules are loaded into that Prometheus and
//! must evaluate cleanly, and every expression of the rules and of the
//! Grafana dashboard is executed against it. `promtool check metrics` lints
//! each live `/metrics`.

mod support;

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use palisade_tests::{
    ControlPlane, eventually, eventually_async, http_get, listening_ports, require_tool,
};
use serde_json::Value;
use support::{Sidecar, echo_app};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
const WEB_TOKEN: &str = "web-token-0123456789abcdef";
const API_TOKEN: &str = "api-token-0123456789abcdef";
const GOOD: usize = 7;
const PLAINTEXT: usize = 3;
const SILENT: usize = 2;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Prometheus server; dropping it kills the process.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Self {
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).expect("write the config");
        let out = Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(&file)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--web.enable-lifecycle")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let pid = child.id();
        let mut prometheus = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let what = format!(
            "prometheus to listen and turn ready; its log:\n{}",
            dir.join("prometheus.log").display()
        );
        prometheus.addr = eventually(Duration::from_secs(30), &what, || {
            let port = *listening_ports(pid).ok()?.first()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            matches!(http_get(addr, "/-/ready"), Ok((200, _))).then_some(addr)
        });
        prometheus
    }

    /// GET `path` with `params` URL-encoded; the `data` of a successful answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "10", "--get"]);
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))?;
        if body["status"] != "success" {
            return Err(format!("{path} {params:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query's samples as (labels, value).
    fn query(&self, expr: &str) -> Vec<(Value, f64)> {
        let data = self
            .api("/api/v1/query", &[("query", expr)])
            .unwrap_or_else(|e| panic!("{e}"));
        data["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| {
                        let v = s["value"][1].as_str().unwrap_or("NaN");
                        (s["metric"].clone(), v.parse().unwrap_or(f64::NAN))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `expr`'s single value equals `want`.
    async fn wait_for_value(&self, expr: &str, want: f64) {
        let what = format!("{expr} to equal {want} in Prometheus");
        eventually_async(Duration::from_secs(20), &what, || async {
            let got = self.query(expr);
            (got.len() == 1 && got[0].1 == want).then_some(())
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on a live `/metrics`: no problem reported.
fn promtool_check_metrics(what: &str, addr: SocketAddr) {
    let (status, body) = http_get(addr, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool finishes");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics on the {what}'s /metrics:\n{report}\n--- metrics ---\n{body}"
    );
}

/// The certificate a sidecar presents, read from its inbound listener with
/// `openssl s_client` (TLS 1.3 sends it before the client certificate is
/// asked for; the handshake then fails with `no_client_cert`).
fn presented_not_after(addr: SocketAddr) -> i64 {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-alpn",
            "palisade/1",
        ])
        .args(["-tls1_3", "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text[begin..]
        .find("-----END CERTIFICATE-----")
        .expect("its end")
        + begin
        + 25;
    let block = pem::parse(&text[begin..end]).expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents()).expect("X.509");
    cert.validity().not_after.timestamp()
}

fn exprs_of_rules_and_dashboard() -> Vec<(String, String)> {
    let venv = std::env::var_os("PALISADE_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/pyenv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing; tests/run.sh makes the venv",
        python.display()
    );
    let out = Command::new(python)
        .arg(workspace().join("tests/monitoring/expressions.py"))
        .arg(workspace())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON lines");
            (
                v["source"].as_str().expect("source").to_owned(),
                v["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_what_the_mesh_did() {
    require_tool("prometheus");
    require_tool("promtool");
    require_tool("openssl");
    require_tool("curl");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[(WEB_TOKEN, WEB), (API_TOKEN, API)], &[])
        .expect("control plane");
    for (name, token) in [("web.token", WEB_TOKEN), ("api.token", API_TOKEN)] {
        std::fs::write(dir.path().join(name), token).expect("token file");
    }
    let bundle = cp.ca_dir.join("ca.crt").display().to_string();
    let grpc = format!("https://{}", cp.grpc_addr);
    let source = |token: &str, identity: &'static str| -> Vec<String> {
        [
            "--control-plane",
            &grpc,
            "--bundle",
            &bundle,
            "--identity",
            identity,
            "--token-file",
            &dir.path().join(token).display().to_string(),
            "--lifetime",
            "1h",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let app = echo_app().await;
    let api_source = source("api.token", API);
    let api_source: Vec<&str> = api_source.iter().map(String::as_str).collect();
    let api = Sidecar::start_with(
        &api_source,
        &["--explicit-inbound", &format!("127.0.0.1:0={app}")],
    )
    .await;
    let web_source = source("web.token", WEB);
    let web_source: Vec<&str> = web_source.iter().map(String::as_str).collect();
    let web = Sidecar::start_with(
        &web_source,
        &[
            "--explicit-outbound",
            &format!("127.0.0.1:0={},{API}", api.inbound[0]),
            "--explicit-inbound",
            &format!("127.0.0.1:0={app}"),
        ],
    )
    .await;
    for s in [&web, &api] {
        eventually_async(
            Duration::from_secs(15),
            "a sidecar to get its certificate",
            || async { matches!(http_get(s.admin, "/ready"), Ok((200, _))).then_some(()) },
        )
        .await;
    }

    // Every metric of the design is there with HELP and TYPE from the start
    // (palisade_authz_decisions_total appears with the first decision: its
    // labels are a port and a policy, and there is no zero to start from).
    for (addr, names) in [
        (
            cp.admin_addr,
            &[
                "palisade_ca_certificates_issued_total",
                "palisade_ca_issue_duration_seconds",
                "palisade_ca_issuer_expiration_timestamp_seconds",
                "palisade_ca_authentication_failures_total",
            ][..],
        ),
        (
            web.admin,
            &[
                "palisade_tls_handshakes_total",
                "palisade_tls_handshake_duration_seconds",
                "palisade_connections_opened_total",
                "palisade_connections_active",
                "palisade_bytes_total",
                "palisade_cert_expiration_timestamp_seconds",
                "palisade_cert_not_before_timestamp_seconds",
                "palisade_cert_renewals_total",
                "palisade_trust_bundle_roots",
            ][..],
        ),
    ] {
        let (_, body) = http_get(addr, "/metrics").expect("metrics");
        for name in names {
            assert!(
                body.contains(&format!("# HELP {name} "))
                    && body.contains(&format!("# TYPE {name} ")),
                "{name} has no HELP/TYPE on {addr}:\n{body}"
            );
        }
    }

    promtool_check_metrics("control plane", cp.admin_addr);
    promtool_check_metrics("web sidecar", web.admin);
    promtool_check_metrics("api sidecar", api.admin);

    let rules = workspace().join("deploy/prometheus/palisade-rules.yaml");
    let config = format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: palisade-control-plane
    static_configs:
      - targets: ["{cp}"]
  - job_name: palisade-sidecar
    static_configs:
      - targets: ["{web}"]
        labels: {{namespace: demo, workload: web}}
      - targets: ["{api}"]
        labels: {{namespace: demo, workload: api}}
"#,
        rules = rules.display(),
        cp = cp.admin_addr,
        web = web.admin,
        api = api.admin,
    );
    let prometheus = Prometheus::start(dir.path(), &config);

    // The traffic: good calls through web -> api, and bad clients at api.
    for i in 0..GOOD {
        let mut tcp = TcpStream::connect(web.outbound[0]).await.expect("connect");
        let msg = format!("hello {i}");
        tcp.write_all(msg.as_bytes()).await.expect("write");
        tcp.shutdown().await.expect("half-close");
        let mut echoed = String::new();
        tcp.read_to_string(&mut echoed).await.expect("read");
        assert_eq!(echoed, msg);
    }
    for _ in 0..PLAINTEXT {
        let mut tcp = TcpStream::connect(api.inbound[0]).await.expect("connect");
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n").await;
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    }
    let silent: Vec<_> = futures_join(SILENT, api.inbound[0]).await;
    // The detect timeout is 1 s: then the silent clients are refused.
    for mut tcp in silent {
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }
    // openssl without a client certificate, once at each sidecar.
    let web_not_after = presented_not_after(web.inbound[0]);
    let api_not_after = presented_not_after(api.inbound[0]);

    let handshakes = |dir: &str, result: &str, reason: &str, workload: &str| {
        format!(
            r#"sum(palisade_tls_handshakes_total{{job="palisade-sidecar",workload="{workload}",direction="{dir}",result="{result}",reason="{reason}"}})"#
        )
    };
    let good = GOOD as f64;
    prometheus
        .wait_for_value(&handshakes("outbound", "success", "ok", "web"), good)
        .await;
    prometheus
        .wait_for_value(&handshakes("inbound", "success", "ok", "api"), good)
        .await;
    prometheus
        .wait_for_value(
            &handshakes("inbound", "failure", "plaintext", "api"),
            PLAINTEXT as f64,
        )
        .await;
    prometheus
        .wait_for_value(
            &handshakes("inbound", "failure", "timeout", "api"),
            SILENT as f64,
        )
        .await;
    for workload in ["web", "api"] {
        prometheus
            .wait_for_value(
                &handshakes("inbound", "failure", "no_client_cert", workload),
                1.0,
            )
            .await;
    }
    // Nothing else failed, anywhere.
    prometheus
        .wait_for_value(
            r#"sum(palisade_tls_handshakes_total{result="failure"})"#,
            (PLAINTEXT + SILENT + 2) as f64,
        )
        .await;
    prometheus
        .wait_for_value(
            &format!(
                r#"sum(palisade_connections_opened_total{{workload="api",direction="inbound",security="mtls",peer_identity="{WEB}"}})"#
            ),
            good,
        )
        .await;
    prometheus
        .wait_for_value(
            r#"sum(palisade_ca_certificates_issued_total{job="palisade-control-plane",result="success"})"#,
            2.0,
        )
        .await;
    prometheus
        .wait_for_value(
            r#"count(palisade_tls_handshake_duration_seconds_count{workload="api",direction="inbound"})"#,
            1.0,
        )
        .await;

    // Each workload's expiry is its certificate's notAfter.
    for (identity, not_after) in [(WEB, web_not_after), (API, api_not_after)] {
        prometheus
            .wait_for_value(
                &format!(r#"palisade_cert_expiration_timestamp_seconds{{identity="{identity}"}}"#),
                not_after as f64,
            )
            .await;
    }

    // The shipped rules loaded and evaluate without error.
    eventually_async(
        Duration::from_secs(20),
        "every rule to evaluate healthy",
        || async {
            let data = prometheus.api("/api/v1/rules", &[]).expect("rules");
            let rules: Vec<&Value> = data["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            assert!(!rules.is_empty(), "no rules loaded: {data}");
            let bad: Vec<_> = rules.iter().filter(|r| r["health"] != "ok").collect();
            if !bad.is_empty() {
                eprintln!("rules not healthy yet: {bad:?}");
            }
            bad.is_empty().then_some(())
        },
    )
    .await;
    // A healthy mesh fires nothing.
    let firing = prometheus.query(r#"ALERTS{alertstate="firing"}"#);
    assert!(
        firing.is_empty(),
        "alerts fire on a healthy mesh: {firing:?}"
    );

    // Every expression of the rules and the dashboard runs.
    let exprs = exprs_of_rules_and_dashboard();
    assert!(exprs.len() >= 10, "too few expressions: {exprs:?}");
    for (source, expr) in &exprs {
        if let Err(e) = prometheus.api("/api/v1/query", &[("query", expr)]) {
            panic!("{source}: {expr}\n{e}");
        }
    }
}

/// Opens `n` connections to `addr` that send nothing.
async fn futures_join(n: usize, addr: SocketAddr) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TcpStream::connect(addr).await.expect("connect"));
    }
    out
}
