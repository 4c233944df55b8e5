//! The injection webhook as the API server meets it: the control-plane binary
//! serving HTTPS with its self-issued certificate, AdmissionReview fixtures
//! (tests/fixtures/admission) posted with curl trusting only the bundle, each
//! patch applied to its pod and the result validated against the Kubernetes
//! 1.33 schema with `kubernetes-validate --strict`. Then the injected
//! containers are run: the sidecar with exactly the environment the webhook
//! wrote must get its certificate, and the init container's environment must
//! produce the expected iptables rules.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use palisade_tests::{ControlPlane, bin, eventually, http_get, metric, require_tool};
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

/// `kubernetes-validate` from the test venv tests/run.sh makes.
fn kubernetes_validate() -> PathBuf {
    let venv = std::env::var_os("PALISADE_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/pyenv"));
    let tool = venv.join("bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "this test needs {} (Python package kubernetes-validate); tests/run.sh installs it \
         into target/pyenv",
        tool.display()
    );
    tool
}

/// POSTs `body` to the webhook like the API server: HTTPS, verified against
/// the trust bundle, for the Service's DNS name.
fn post(addr: SocketAddr, bundle: &Path, body: &Path) -> Result<(u16, Value)> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--cacert")
        .arg(bundle)
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("https://localhost:{}/inject", addr.port()))
        .output()?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let (json, code) = text.rsplit_once('\n').context("status line")?;
    Ok((code.trim().parse()?, serde_json::from_str(json)?))
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no init container {name} in {pod}"))
}

fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_owned();
            (name, e["value"].as_str().expect("value").to_owned())
        })
        .collect()
}

#[test]
fn admission_reviews_get_the_expected_answers_and_schema_valid_pods() -> Result<()> {
    require_tool("curl");
    let validate = kubernetes_validate();
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
        let (code, answer) = post(webhook, &bundle, &path)?;
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
                let patch = base64::engine::general_purpose::STANDARD
                    .decode(response["patch"].as_str().context("patch is base64 text")?)?;
                let patch: json_patch::Patch = serde_json::from_slice(&patch)?;
                let mut pod = request["request"]["object"].clone();
                json_patch::patch(&mut pod, &patch)
                    .with_context(|| format!("{name}: the patch does not apply"))?;
                // The API server fills in a generateName'd pod's name after
                // admission; the schema check wants one.
                if pod["metadata"]["name"].is_null() {
                    let prefix = pod["metadata"]["generateName"].as_str().unwrap_or("pod-");
                    pod["metadata"]["name"] = Value::String(format!("{prefix}x7k2p"));
                }
                let file = dir.path().join(format!("{name}.patched.json"));
                std::fs::write(&file, serde_json::to_vec_pretty(&pod)?)?;
                patched_pods.push((name, file, pod));
            } else {
                assert!(response["patch"].is_null(), "{name}: unchanged, {answer}");
            }
        }
    }

    // Every patched pod is a valid Kubernetes 1.33 Pod, unknown fields refused.
    let files: Vec<_> = patched_pods.iter().map(|(_, f, _)| f.clone()).collect();
    let out = Command::new(&validate)
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate refused a patched pod:\n{report}"
    );
    assert_eq!(report.matches("passed").count(), files.len(), "{report}");

    // The port annotations reached both containers, merged with the defaults.
    let (_, _, db) = patched_pods
        .iter()
        .find(|(n, _, _)| *n == "port-annotations")
        .context("port-annotations patched")?;
    let init_env = env_of(container(db, "palisade-init"));
    let sidecar_env = env_of(container(db, "palisade-sidecar"));
    let get = |env: &[(String, String)], k: &str| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
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
    let (_, _, web) = patched_pods
        .iter()
        .find(|(n, _, _)| *n == "ordinary-pod")
        .context("ordinary pod patched")?;
    let web_env = env_of(container(web, "palisade-sidecar"));
    for (name, _) in &web_env {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "the sidecar has no {name}"
        );
    }
    assert_eq!(get(&web_env, "PALISADE_IDENTITY").as_deref(), Some(WEB));

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
    let stderr = child.stderr.take().context("stderr is piped")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[sidecar] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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
