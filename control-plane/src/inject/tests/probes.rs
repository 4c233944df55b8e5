//! Probe rewriting: each probe kind, named and numbered ports, native
//! sidecars, the original kept, and what cannot be rewritten.

use serde_json::{Value, json};

use super::{env, env_of, injector, pod, run};
use crate::inject::probes::ORIGINAL_PROBES;

fn spec() -> Value {
    json!({
        "serviceAccountName": "web",
        "initContainers": [
            {"name": "migrate", "image": "migrate:1"},
            {"name": "log-shipper", "image": "ship:1", "restartPolicy": "Always",
             "ports": [{"name": "ship-health", "containerPort": 9200}],
             "startupProbe": {"tcpSocket": {"port": "ship-health"}, "failureThreshold": 30}},
        ],
        "containers": [{
            "name": "web", "image": "web:1",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
            "livenessProbe": {
                "httpGet": {"path": "/healthz?full=1", "port": "http", "scheme": "HTTPS",
                            "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]},
                "initialDelaySeconds": 3, "periodSeconds": 7, "timeoutSeconds": 2, "failureThreshold": 4,
            },
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5},
            "startupProbe": {"grpc": {"port": 9090, "service": "web.v1"}},
        }, {
            "name": "cron", "image": "cron:1",
            "livenessProbe": {"exec": {"command": ["true"]}},
        }],
    })
}

#[test]
fn every_probe_kind_goes_to_the_admin_port_and_the_sidecar_gets_the_original() {
    let (injector, _) = injector();
    let original = pod(Value::Null, spec());
    let (_, body, patched) = run(&injector, &original);
    assert_eq!(body["response"]["allowed"], true, "{body}");

    let web = &patched["spec"]["containers"][0];
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/web/liveness", "port": 15020, "scheme": "HTTP"},
               "initialDelaySeconds": 3, "periodSeconds": 7, "timeoutSeconds": 2, "failureThreshold": 4}),
        "timing kept, handler replaced"
    );
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/web/readiness", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 5})
    );
    assert_eq!(
        web["startupProbe"]["httpGet"]["path"],
        "/app-health/web/startup"
    );
    // exec runs in the container: untouched.
    assert_eq!(
        patched["spec"]["containers"][1]["livenessProbe"],
        json!({"exec": {"command": ["true"]}})
    );
    // The pod's init containers moved behind ours; the native sidecar's
    // probe was rewritten where it was.
    let inits = patched["spec"]["initContainers"].as_array().expect("inits");
    let shipper = inits
        .iter()
        .find(|c| c["name"] == "log-shipper")
        .expect("the pod's native sidecar");
    assert_eq!(
        shipper["startupProbe"],
        json!({"httpGet": {"path": "/app-health/log-shipper/startup", "port": 15020, "scheme": "HTTP"},
               "failureThreshold": 30})
    );
    assert!(
        inits
            .iter()
            .find(|c| c["name"] == "migrate")
            .expect("migrate")
            .get("startupProbe")
            .is_none()
    );

    // The sidecar's instructions: ports resolved, path, headers, scheme kept.
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    let app: Value =
        serde_json::from_str(env(&sidecar, "PALISADE_APP_PROBES").expect("probes")).expect("JSON");
    assert_eq!(
        app,
        json!({
            "web/liveness": {"httpGet": {"port": 8080, "path": "/healthz?full=1", "scheme": "HTTPS",
                             "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 2},
            "web/readiness": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
            "web/startup": {"grpc": {"port": 9090, "service": "web.v1"}, "timeoutSeconds": 1},
            "log-shipper/startup": {"tcpSocket": {"port": 9200}, "timeoutSeconds": 1},
        })
    );
    assert_eq!(
        env(&sidecar, "PALISADE_POD_IP"),
        Some("fieldRef:status.podIP")
    );

    // The originals, verbatim, in the annotation.
    let kept: Value = serde_json::from_str(
        patched["metadata"]["annotations"][ORIGINAL_PROBES]
            .as_str()
            .expect("the annotation"),
    )
    .expect("JSON");
    assert_eq!(
        kept["web"]["livenessProbe"],
        original["spec"]["containers"][0]["livenessProbe"]
    );
    assert_eq!(
        kept["log-shipper"]["startupProbe"],
        original["spec"]["initContainers"][1]["startupProbe"]
    );
    assert!(kept.get("cron").is_none(), "exec probes are not rewritten");
}

#[test]
fn a_pod_without_probes_gets_no_probe_env_or_annotation() {
    let (injector, _) = injector();
    let (_, _, patched) = run(&injector, &pod(Value::Null, super::web_spec()));
    let sidecar = env_of(&patched["spec"]["initContainers"][1]);
    assert_eq!(env(&sidecar, "PALISADE_APP_PROBES"), None);
    assert_eq!(env(&sidecar, "PALISADE_POD_IP"), None);
    assert!(
        patched["metadata"]["annotations"]
            .get(ORIGINAL_PROBES)
            .is_none()
    );
}

#[test]
fn probes_that_cannot_be_rewritten_are_refused_and_named() {
    let (injector, _) = injector();
    for (probe, needle) in [
        (
            json!({"httpGet": {"port": "metrics"}}),
            "port \"metrics\" names none of the container's ports",
        ),
        (
            json!({"tcpSocket": {"port": 0}}),
            "port 0 is not in 1..=65535",
        ),
        (
            json!({"tcpSocket": {"port": 70000}}),
            "port 70000 is not in 1..=65535",
        ),
        (json!({"grpc": {"port": "grpc"}}), "grpc"),
        (
            json!({"httpGet": {"port": 8080, "host": "10.0.0.9"}}),
            "host \"10.0.0.9\" is not the pod",
        ),
        (
            json!({"httpGet": {"port": 8080, "scheme": "FTP"}}),
            "scheme \"FTP\"",
        ),
    ] {
        let mut spec = super::web_spec();
        spec["containers"][0]["ports"] = json!([{"name": "grpc", "containerPort": 9090}]);
        spec["containers"][0]["livenessProbe"] = probe.clone();
        let (_, body, _) = run(&injector, &pod(Value::Null, spec));
        assert_eq!(body["response"]["allowed"], false, "{probe}: {body}");
        let message = body["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(message.contains(needle), "{probe}: {message}");
        assert!(message.contains("container \"web\""), "{message}");
    }
    // host: localhost is the pod itself.
    let mut spec = super::web_spec();
    spec["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"port": 8080, "host": "localhost", "path": "/ready"}});
    let (_, body, _) = run(&injector, &pod(Value::Null, spec));
    assert_eq!(body["response"]["allowed"], true, "{body}");
}
