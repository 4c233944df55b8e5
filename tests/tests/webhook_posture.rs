//! The enforced posture as the API server meets it: the control-plane binary
//! following Namespaces and InboundPolicies on the stand-in API server
//! (`--discovery-source kubernetes`), AdmissionReviews posted over HTTPS to
//! `/enforce` and `/inject` as the chart's two webhook entries send them,
//! and every patched pod checked against the Kubernetes 1.33 schemas.
//!
//! `shop` enforces the mesh (`palisade.io/enforce=true`); an InboundPolicy
//! there makes `app=web` strict and lets port 9090 be excluded. `lab` only
//! opted in to injection.

use std::{net::TcpListener, path::Path, process::Command, str::FromStr, time::Duration};

use anyhow::{Context, Result};
use palisade_sidecar::probe::AppProbes;
use palisade_tests::{
    ControlPlane,
    admission::{assert_schema_valid, container, env, env_of, patched, post},
    bin, eventually,
    kube::ApiServer,
    metric, require_tool, write_tokens,
};
use serde_json::{Value, json};

const INJECTION_CONFIG: &str = r#"
sidecar:
  image: ghcr.io/palisade-mesh/palisade-sidecar:0.1.0
  excludeOutboundPorts: [53]
init:
  image: ghcr.io/palisade-mesh/palisade-init:0.1.0
controlPlane:
  address: https://palisade-control-plane.palisade.svc:15012
  serverName: palisade-control-plane.palisade.svc
"#;

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A pod of `app=web` in `namespace`, with `annotations` (may be null) and
/// its first container's fields merged with `fields`.
fn web(namespace: &str, annotations: Value, fields: Value) -> Value {
    let mut app = json!({
        "name": "web",
        "image": "web:1",
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
    });
    if let Value::Object(fields) = fields {
        for (k, v) in fields {
            app[k] = v;
        }
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [app]},
    });
    if !annotations.is_null() {
        pod["metadata"]["annotations"] = annotations;
    }
    pod
}

fn review(
    uid: u32,
    operation: &str,
    sub_resource: Option<&str>,
    pod: &Value,
    old: &Value,
) -> Value {
    let mut request = json!({
        "uid": format!("00000000-0000-4000-8000-{uid:012}"),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": pod["metadata"]["namespace"],
        "operation": operation,
        "userInfo": {"username": "tenant"},
        "object": pod,
        "oldObject": old,
        "dryRun": false,
    });
    if let Some(sub) = sub_resource {
        request["subResource"] = json!(sub);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// Posts reviews to one control plane's webhook.
struct Webhook<'a> {
    cp: &'a ControlPlane,
    dir: &'a Path,
    sent: u32,
}

impl Webhook<'_> {
    fn post(&mut self, path: &str, review: &Value) -> Result<(u16, Value)> {
        self.sent += 1;
        let file = self.dir.join(format!("review-{}.json", self.sent));
        std::fs::write(&file, serde_json::to_vec(review)?)?;
        let addr = self.cp.webhook_addr.context("the webhook is served")?;
        post(addr, &self.cp.ca_dir.join("ca.crt"), path, &file)
    }

    fn create(&mut self, path: &str, pod: &Value) -> Result<(u16, Value)> {
        let review = review(self.sent, "CREATE", None, pod, &Value::Null);
        self.post(path, &review)
    }

    /// The refusal's message; fails unless `pod` was refused.
    fn refused(&mut self, path: &str, pod: &Value) -> Result<String> {
        let (status, answer) = self.create(path, pod)?;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["allowed"], false, "admitted: {pod}");
        Ok(answer["response"]["status"]["message"]
            .as_str()
            .context("a message")?
            .to_owned())
    }

    /// The patched pod; fails unless `pod` was admitted with a patch.
    fn injected(&mut self, path: &str, pod: &Value) -> Result<Value> {
        let (status, answer) = self.create(path, pod)?;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        patched(&review(0, "CREATE", None, pod, &Value::Null), &answer)
    }
}

fn start_control_plane(dir: &Path, api: &ApiServer) -> Result<ControlPlane> {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)?;
    let ca = dir.join("ca");
    let status = Command::new(bin("palisade-control-plane"))
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .status()?;
    assert!(status.success());
    let tokens = dir.join("tokens.yaml");
    write_tokens(
        &tokens,
        &[(
            "token-of-workload-web",
            "spiffe://cluster.local/ns/shop/sa/web",
        )],
    )?;
    let config = dir.join("injection.yaml");
    std::fs::write(&config, INJECTION_CONFIG)?;
    ControlPlane::spawn(
        &ca,
        &[
            "--authenticator",
            "static",
            "--static-tokens",
            tokens.to_str().context("utf-8")?,
        ],
        &[("KUBECONFIG", kubeconfig.as_path())],
        &[
            "--discovery-source",
            "kubernetes",
            "--injection-config",
            config.to_str().context("utf-8")?,
            "--webhook-addr",
            "127.0.0.1:0",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_cannot_slip_out_of_an_enforcing_namespace_and_strict_pods_keep_their_probes()
-> Result<()> {
    require_tool("curl");
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // The app the rewritten TCP probe must reach.
    let app = TcpListener::bind("127.0.0.1:0")?;
    let app_port = app.local_addr()?.port();

    let api = ApiServer::builder()
        .palisade_crds()
        .object(namespace(
            "shop",
            json!({"palisade.io/inject": "enabled", "palisade.io/enforce": "true"}),
        ))
        .object(namespace("lab", json!({"palisade.io/inject": "enabled"})))
        .object(json!({
            "apiVersion": "policy.palisade.io/v1alpha1",
            "kind": "InboundPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "mode": "strict",
                     "excludablePorts": [9090]},
        }))
        .start()
        .await?;
    let cp = start_control_plane(d, &api)?;
    let mut hook = Webhook {
        cp: &cp,
        dir: d,
        sent: 0,
    };
    // The webhook answers once its caches synced (503 until then: the
    // API server retries under failurePolicy Fail).
    let plain = web("shop", Value::Null, json!({}));
    eventually(
        Duration::from_secs(20),
        "the webhook's caches to sync",
        || matches!(hook.create("/enforce", &plain), Ok((200, _))).then_some(()),
    );

    // Every way out of the mesh, refused with what to change.
    let pod_as = |security: Value| {
        let mut pod = web("shop", Value::Null, json!({}));
        pod["spec"]["securityContext"] = security;
        pod
    };
    let init = |fields: Value| {
        let mut pod = web("shop", Value::Null, json!({}));
        let mut c = json!({"name": "setup", "image": "setup:1"});
        for (k, v) in fields.as_object().cloned().unwrap_or_default() {
            c[k] = v;
        }
        pod["spec"]["initContainers"] = json!([c]);
        pod
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "opt-out annotation",
            web("shop", json!({"palisade.io/inject": "false"}), json!({})),
            "remove palisade.io/inject",
        ),
        (
            "pre-set injected",
            web("shop", json!({"palisade.io/injected": "true"}), json!({})),
            "only the webhook writes it",
        ),
        (
            "our name",
            web("shop", Value::Null, json!({"name": "palisade-sidecar"})),
            "palisade-*",
        ),
        (
            "pod uid 1337",
            pod_as(json!({"runAsUser": 1337})),
            "another uid than 1337",
        ),
        (
            "init uid 1337",
            init(json!({"securityContext": {"runAsUser": 1337}})),
            "another uid than 1337",
        ),
        (
            "privileged",
            web(
                "shop",
                Value::Null,
                json!({"securityContext": {"privileged": true}}),
            ),
            "privileged",
        ),
        (
            "NET_ADMIN",
            init(json!({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}})),
            "remove NET_ADMIN",
        ),
        (
            "cap_net_raw",
            web(
                "shop",
                Value::Null,
                json!({"securityContext": {"capabilities": {"add": ["cap_net_raw"]}}}),
            ),
            "remove cap_net_raw",
        ),
        (
            "host network",
            {
                let mut p = plain.clone();
                p["spec"]["hostNetwork"] = json!(true);
                p
            },
            "hostNetwork",
        ),
        (
            "permissive",
            web(
                "shop",
                json!({"palisade.io/inbound-mode": "permissive"}),
                json!({}),
            ),
            "mode: permissive",
        ),
        (
            "unlisted exclusion",
            web(
                "shop",
                json!({"palisade.io/exclude-inbound-ports": "8080"}),
                json!({}),
            ),
            "remove 8080",
        ),
        (
            "outbound exclusion",
            web(
                "shop",
                json!({"palisade.io/exclude-outbound-ports": "5432"}),
                json!({}),
            ),
            "excludeOutboundPorts",
        ),
        (
            "probe to another host",
            web(
                "shop",
                Value::Null,
                json!({"livenessProbe": {"tcpSocket": {"port": 8080, "host": "10.0.0.1"}}}),
            ),
            "host",
        ),
    ];
    for (case, pod, fix) in &cases {
        let message = hook.refused("/enforce", pod)?;
        assert!(
            message.contains("palisade sidecar injection"),
            "{case}: {message}"
        );
        assert!(
            message.contains(fix),
            "{case}: {message:?} does not say {fix:?}"
        );
    }
    // The opt-out label too: the enforce entry has no objectSelector.
    let mut labelled = plain.clone();
    labelled["metadata"]["labels"]["palisade.io/inject"] = json!("disabled");
    assert!(
        hook.refused("/enforce", &labelled)?
            .contains("remove palisade.io/inject")
    );

    // kubectl debug: an ephemeral container with NET_ADMIN is refused, one
    // without is let through.
    let running = hook.injected("/enforce", &plain)?;
    let with_debug = |caps: Value| {
        let mut pod = running.clone();
        pod["spec"]["ephemeralContainers"] = json!([{
            "name": "debugger", "image": "busybox", "targetContainerName": "web",
            "securityContext": {"capabilities": {"add": caps}},
        }]);
        pod
    };
    let (status, answer) = hook.post(
        "/enforce",
        &review(
            900,
            "UPDATE",
            Some("ephemeralcontainers"),
            &with_debug(json!(["NET_ADMIN"])),
            &running,
        ),
    )?;
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(false)),
        "{answer}"
    );
    let (_, answer) = hook.post(
        "/enforce",
        &review(
            901,
            "UPDATE",
            Some("ephemeralcontainers"),
            &with_debug(json!(["SYS_PTRACE"])),
            &running,
        ),
    )?;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");

    // Admitted: the listed exclusion, the tightening annotation, and a
    // strict pod with every kind of probe, on named and numbered ports.
    let mut admitted = vec![
        (
            "excluded-9090",
            hook.injected(
                "/enforce",
                &web(
                    "shop",
                    json!({"palisade.io/exclude-inbound-ports": "9090"}),
                    json!({}),
                ),
            )?,
        ),
        (
            "tightened",
            hook.injected(
                "/enforce",
                &web(
                    "shop",
                    json!({"palisade.io/inbound-mode": "strict"}),
                    json!({}),
                ),
            )?,
        ),
    ];
    let init_env = env_of(container(&admitted[0].1, "palisade-init"));
    assert_eq!(
        env(&init_env, "PALISADE_EXCLUDE_INBOUND_PORTS"),
        Some("9090")
    );
    let probed = web(
        "shop",
        Value::Null,
        json!({
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "tcp", "containerPort": app_port}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http",
                               "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 3},
            "livenessProbe": {"tcpSocket": {"port": "tcp"}, "failureThreshold": 5},
            "startupProbe": {"grpc": {"port": 9091}},
        }),
    );
    let pod = hook.injected("/enforce", &probed)?;
    let app_container = container(&pod, "web");
    for (probe, kind) in [
        ("readiness", "readinessProbe"),
        ("liveness", "livenessProbe"),
        ("startup", "startupProbe"),
    ] {
        let rewritten = &app_container[kind];
        assert_eq!(rewritten["httpGet"]["port"], 15020, "{kind}: {rewritten}");
        assert_eq!(
            rewritten["httpGet"]["path"],
            format!("/app-health/web/{probe}"),
            "{kind}"
        );
    }
    assert_eq!(app_container["readinessProbe"]["periodSeconds"], 3);
    assert_eq!(app_container["livenessProbe"]["failureThreshold"], 5);
    let sidecar_env = env_of(container(&pod, "palisade-sidecar"));
    assert_eq!(env(&sidecar_env, "PALISADE_INBOUND_MODE"), Some("strict"));
    assert_eq!(
        env(&sidecar_env, "PALISADE_POD_IP"),
        Some("fieldRef:status.podIP")
    );
    // What the sidecar gets parses as its --app-probes, ports resolved.
    let probes = AppProbes::from_str(env(&sidecar_env, "PALISADE_APP_PROBES").context("probes")?)?;
    let shown = serde_json::to_value(&probes)?;
    assert_eq!(shown["web/readiness"]["httpGet"]["port"], 8080, "{shown}");
    assert_eq!(shown["web/readiness"]["httpGet"]["path"], "/ready");
    assert_eq!(shown["web/liveness"]["tcpSocket"]["port"], app_port);
    assert_eq!(shown["web/startup"]["grpc"]["port"], 9091);
    // ...and the sidecar binary runs them: the TCP probe reaches the app.
    let admin = run_sidecar_probe(
        d,
        env(&sidecar_env, "PALISADE_APP_PROBES").context("probes")?,
    )?;
    assert_eq!(admin.0, 200, "the TCP probe of a live app: {}", admin.1);
    drop(app);
    admitted.push(("probed", pod));

    // A namespace that only opted in keeps the pod's own choices at /inject.
    let (status, answer) = hook.create(
        "/inject",
        &web("lab", json!({"palisade.io/inject": "false"}), json!({})),
    )?;
    assert_eq!(
        (status, answer["response"]["allowed"].clone()),
        (200, json!(true))
    );
    assert!(answer["response"]["patch"].is_null(), "opted out: {answer}");
    admitted.push((
        "lab-permissive",
        hook.injected(
            "/inject",
            &web(
                "lab",
                json!({"palisade.io/inbound-mode": "permissive"}),
                json!({}),
            ),
        )?,
    ));
    // ...and /enforce enforces whatever the caches say (the entry is the
    // cluster admin's).
    hook.refused(
        "/enforce",
        &web("lab", json!({"palisade.io/inject": "false"}), json!({})),
    )?;

    assert_schema_valid(d, &admitted)?;

    let metrics = cp.metrics()?;
    let denied = |reason| {
        metric(
            &metrics,
            "palisade_webhook_reviews_total",
            &[("result", "denied"), ("reason", reason)],
        )
    };
    assert_eq!(denied("bad_probe"), 1.0, "{metrics}");
    assert_eq!(
        denied("enforced"),
        (cases.len() - 1 + 1 + 1 + 1) as f64,
        "{metrics}"
    );
    Ok(())
}

/// Runs `palisade-sidecar run` with `--app-probes probes` and returns what
/// its admin port answers for the liveness probe of `web`.
fn run_sidecar_probe(dir: &Path, probes: &str) -> Result<(u16, String)> {
    let certs = dir.join("no-certs");
    std::fs::create_dir_all(&certs)?;
    let mut child = Command::new(bin("palisade-sidecar"))
        .args(["run", "--cert-dir"])
        .arg(&certs)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--pod-ip", "127.0.0.1", "--app-probes", probes])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = (|| {
        let ports = eventually(Duration::from_secs(20), "the sidecar to listen", || {
            palisade_tests::listening_ports(child.id())
                .ok()
                .filter(|p| p.len() >= 3)
        });
        // The admin port is the one that answers /live.
        let admin = ports
            .iter()
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
            .find(|a| matches!(palisade_tests::http_get(*a, "/live"), Ok((200, _))))
            .context("no admin port")?;
        palisade_tests::http_get(admin, "/app-health/web/liveness")
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
