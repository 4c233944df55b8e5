//! The injection webhook as the API server meets it: the control-plane binary
//! serving HTTPS with its self-issued certificate, AdmissionReview fixtures
//! (tests/fixtures/admission) posted with curl trusting only the bundle, each
//! patch applied to its pod and the result validated against the Kubernetes
//! 1.33 schema with `kubernetes-validate --strict`. Then the injected
//! containers are run: the sidecar with exactly the environment the webhook
//! wrote must get its certificate, and the init container's environment must
//! produce the expected iptables rules.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use palisade_tests::{
    ControlPlane,
    admission::{assert_schema_valid, container, env, env_of, patched, post},
    bin, eventually, follow_stderr, http_get, metric, require_tool,
};
use serde_json::Value;

const INJECTION_CONFIG: &str = r#"
sidecar:
  image: ghcr.io/palisade-mesh/palisade-sidecar:0.1.0
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 128Mi}
  excludeOutboundPorts: [53]
  serverFirstPorts: [3306, 25]
init:
  image: ghcr.io/palisade-mesh/palisade-init:0.1.0
  resources:
    limits: {cpu: 100m, memory: 32Mi}
controlPlane:
  address: https://palisade-control-plane.palisade.svc:15012
  serverName: palisade-control-plane.palisade.svc
"#;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

/// What the API server must get back for one fixture.
struct Expect {
    fixture: &'static str,
    http: u16,
    allowed: bool,
    patched: bool,
    /// A piece of `response.status.message`, for refusals.
    message: &'static str,
}

const FIXTURES: &[Expect] = &[
    Expect {
        fixture: "ordinary-pod",
        http: 200,
        allowed: true,
        patched: true,
        message: "",
    },
    Expect {
        fixture: "already-injected",
        http: 200,
        allowed: true,
        patched: false,
        message: "",
    },
    Expect {
        fixture: "opted-out",
        http: 200,
        allowed: true,
        patched: false,
        message: "",
    },
    Expect {
        fixture: "host-network",
        http: 200,
        allowed: true,
        patched: false,
        message: "",
    },
    Expect {
        fixture: "port-annotations",
        http: 200,
        allowed: true,
        patched: true,
        message: "",
    },
    Expect {
        fixture: "dry-run",
        http: 200,
        allowed: true,
        patched: true,
        message: "",
    },
    Expect {
        fixture: "update",
        http: 200,
        allowed: true,
        patched: false,
        message: "",
    },
    Expect {
        fixture: "bad-annotation",
        http: 200,
        allowed: false,
        patched: false,
        message: "palisade.io/exclude-outbound-ports",
    },
    Expect {
        fixture: "malformed",
        http: 400,
        allowed: false,
        patched: false,
        message: "malformed AdmissionReview",
    },
    Expect {
        fixture: "unknown-version",
        http: 400,
        allowed: false,
        patched: false,
        message: "admission.k8s.io/v1beta1",
    },
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn admission_reviews_get_the_expected_answers_and_schema_valid_pods() -> Result<()> {
    require_tool("curl");
    let fixtures = workspace().join("tests/fixtures/admission");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("injection.yaml");
    std::fs::write(&config, INJECTION_CONFIG)?;
    let cp = ControlPlane::start(
        dir.path(),
        &[("tok-web-0123456789abcdef", WEB)],
        &[
            "--injection-config",
            config.to_str().context("utf-8 path")?,
            "--webhook-addr",
            "127.0.0.1:0",
        ],
    )?;
    let webhook = cp.webhook_addr.context("the webhook is served")?;
    let bundle = cp.ca_dir.join("ca.crt");

    let mut patched_pods = Vec::new();
    for expect in FIXTURES {
        let path = fixtures.join(format!("{}.json", expect.fixture));
        let (code, answer) = post(webhook, &bundle, "/inject", &path)?;
        let name = expect.fixture;
        assert_eq!(code, expect.http, "{name}: {answer}");
        let response = &answer["response"];
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(answer["kind"], "AdmissionReview", "{name}");
        assert_eq!(response["allowed"], expect.allowed, "{name}: {answer}");
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(expect.message),
            "{name}: {answer}"
        );
        if expect.http == 200 {
            let request: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            assert_eq!(
                response["uid"], request["request"]["uid"],
                "{name}: uid echoed"
            );
            if expect.patched {
                assert_eq!(response["patchType"], "JSONPatch", "{name}");
                let pod = patched(&request, &answer).with_context(|| name.to_owned())?;
                patched_pods.push((name, pod));
            } else {
                assert!(response["patch"].is_null(), "{name}: unchanged, {answer}");
            }
        }
    }

    // Every patched pod is a valid Kubernetes 1.33 Pod, unknown fields refused.
    assert_schema_valid(dir.path(), &patched_pods)?;

    // The port annotations reached both containers, merged with the defaults.
    let (_, db) = patched_pods
        .iter()
        .find(|(n, _)| *n == "port-annotations")
        .context("port-annotations patched")?;
    let init_env = env_of(container(db, "palisade-init"));
    let sidecar_env = env_of(container(db, "palisade-sidecar"));
    let get = |env_: &[(String, String)], k: &str| env(env_, k).map(str::to_owned);
    assert_eq!(
        get(&init_env, "PALISADE_EXCLUDE_OUTBOUND_PORTS").as_deref(),
        Some("53,5432,6379")
    );
    assert_eq!(
        get(&init_env, "PALISADE_EXCLUDE_INBOUND_PORTS").as_deref(),
        Some("9187")
    );
    assert_eq!(
        get(&sidecar_env, "PALISADE_SERVER_FIRST_PORTS").as_deref(),
        Some("25,3306,5432")
    );
    assert_eq!(
        get(&sidecar_env, "PALISADE_INBOUND_MODE").as_deref(),
        Some("strict")
    );
    assert_eq!(
        get(&sidecar_env, "PALISADE_IDENTITY").as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    let names: Vec<_> = db["spec"]["initContainers"]
        .as_array()
        .context("init containers")?
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["palisade-init", "palisade-sidecar", "migrate"]);

    // The init container's environment gives the rules it should.
    let rules = Command::new(bin("palisade-sidecar"))
        .args(
            container(db, "palisade-init")["args"]
                .as_array()
                .context("args")?
                .iter()
                .filter_map(Value::as_str),
        )
        .arg("--dry-run")
        .env_clear()
        .envs(init_env.iter().map(|(k, v)| (k, v)))
        .output()?;
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stderr)
    );
    let rules = String::from_utf8(rules.stdout)?;
    for needle in [
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 9187 -j RETURN",
        "-A PALISADE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A PALISADE_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
        "-A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
    ] {
        assert!(rules.contains(needle), "missing {needle:?} in\n{rules}");
    }

    // Every variable the webhook sets is one the sidecar reads.
    let help = Command::new(bin("palisade-sidecar"))
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    let (_, web) = patched_pods
        .iter()
        .find(|(n, _)| *n == "ordinary-pod")
        .context("ordinary pod patched")?;
    let web_env = env_of(container(web, "palisade-sidecar"));
    for (name, _) in &web_env {
        assert!(
            // `[env: NAME=default]`, or `[env: NAME]` for a value clap hides.
            help.contains(&format!("[env: {name}=")) || help.contains(&format!("[env: {name}]")),
            "the sidecar has no {name}"
        );
    }
    assert_eq!(get(&web_env, "PALISADE_IDENTITY").as_deref(), Some(WEB));
    // Its readiness probe now asks the sidecar, which probes the app.
    let probe = &container(web, "web")["readinessProbe"];
    assert_eq!(probe["httpGet"]["port"], 15020, "{probe}");
    assert_eq!(probe["httpGet"]["path"], "/app-health/web/readiness");
    assert_eq!(probe["periodSeconds"], 5, "timing kept: {probe}");
    assert!(
        web["metadata"]["annotations"]["palisade.io/original-probes"].is_string(),
        "the original probe is kept"
    );

    let metrics = cp.metrics()?;
    let count = |result, reason| {
        metric(
            &metrics,
            "palisade_webhook_reviews_total",
            &[("result", result), ("reason", reason)],
        )
    };
    assert_eq!(count("injected", "injected"), 3.0, "{metrics}");
    assert_eq!(count("skipped", "already_injected"), 1.0);
    assert_eq!(count("skipped", "opted_out"), 1.0);
    assert_eq!(count("skipped", "host_network"), 1.0);
    assert_eq!(count("skipped", "not_pod_create"), 1.0);
    assert_eq!(count("denied", "bad_annotation"), 1.0);
    assert_eq!(count("invalid", "malformed"), 1.0);
    assert_eq!(count("invalid", "unsupported_version"), 1.0);

    run_injected_sidecar(&cp, dir.path(), web_env)
}

/// Runs the sidecar with the environment the webhook wrote, only the paths
/// and addresses of a pod swapped for this machine's, and waits for its
/// certificate.
fn run_injected_sidecar(cp: &ControlPlane, dir: &Path, env: Vec<(String, String)>) -> Result<()> {
    let token = dir.join("token");
    std::fs::write(&token, "tok-web-0123456789abcdef")?;
    let local = |k: &str, v: String| -> String {
        match k {
            "PALISADE_TOKEN_FILE" => token.display().to_string(),
            "PALISADE_BUNDLE" => cp.ca_dir.join("ca.crt").display().to_string(),
            "PALISADE_CONTROL_PLANE" => format!("https://localhost:{}", cp.grpc_addr.port()),
            "PALISADE_CONTROL_PLANE_NAME" => "localhost".to_owned(),
            "PALISADE_POD_IP" => "127.0.0.1".to_owned(),
            _ => v,
        }
    };
    let mut child = Command::new(bin("palisade-sidecar"))
        .arg("run")
        .env_clear()
        .envs(env.into_iter().map(|(k, v)| {
            let v = local(&k, v);
            (k, v)
        }))
        // Port 0 everywhere; the sidecar says where it listens.
        .env("PALISADE_ADMIN_ADDR", "127.0.0.1:0")
        .env("PALISADE_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("PALISADE_INBOUND_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting palisade-sidecar")?;
    let lines = follow_stderr(&mut child, "sidecar").context("stderr is piped")?;
    let result = (|| -> Result<String> {
        // The webhook turns JSON logs on; the "serving" line names the admin address.
        let admin: SocketAddr = eventually(Duration::from_secs(20), "the sidecar to serve", || {
            std::iter::from_fn(|| lines.try_recv().ok()).find_map(|line| {
                let line: Value = serde_json::from_str(&line).ok()?;
                (line["message"] == "serving").then(|| line["admin"].as_str()?.parse().ok())?
            })
        });
        eventually(
            Duration::from_secs(20),
            "the injected sidecar to turn ready",
            || matches!(http_get(admin, "/ready"), Ok((200, _))).then_some(()),
        );
        // The rewritten probe is served (200 or 503 by whether something
        // answers on 8080 here); a probe the webhook did not write is not.
        let (status, body) = http_get(admin, "/app-health/web/readiness")?;
        assert!(matches!(status, 200 | 503), "{status} {body}");
        assert_eq!(http_get(admin, "/app-health/web/liveness")?.0, 404);
        Ok(http_get(admin, "/metrics")?.1)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let metrics = result?;
    let expiry = metric(
        &metrics,
        "palisade_cert_expiration_timestamp_seconds",
        &[("identity", WEB)],
    );
    assert!(expiry > 0.0, "no certificate for {WEB}:\n{metrics}");
    Ok(())
}
