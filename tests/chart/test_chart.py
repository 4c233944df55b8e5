"""Tests of the Helm chart helm/palisade, through the real Helm v4 engine.

Run from the repository root:

    target/pyenv/bin/python -m pytest tests/chart -q

Each scenario (default values, values-ha.yaml, a bring-your-own CA, monitoring
and the less common knobs, discovery off) is rendered by the Helm engine that
helm-python-sdk bundles, linted (strict, Kubernetes 1.33), and every rendered
document is validated against the Kubernetes 1.33 OpenAPI schemas with
kubernetes-validate in strict mode (unknown fields are errors). The
Prometheus Operator kinds have no schema there (kubernetes-validate raises
SchemaNotFoundError for them, and its CLI only warns and exits 0), so they
are checked against the small JSON schemas below, written from the
prometheus-operator CRDs. Then the things an operator would notice are
asserted: names agree across objects, RBAC is exactly what the control plane
needs, the pod is locked down, the webhook reaches the Service, the CA is a
CA, the injection config has the keys the control plane reads, the policy
CRDs are the generated ones and the mesh-wide policy default reaches both
the control plane and the sidecars.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from kube_stand_in import StandIn

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "palisade"
HERE = Path(__file__).resolve().parent
KUBE_VERSION = "1.33.0"
RELEASE = "palisade"
NAMESPACE = "palisade-system"

SCENARIOS = {
    "default": None,
    "ha": CHART / "values-ha.yaml",
    "byo-ca": HERE / "values-byo-ca.yaml",
    "monitoring": HERE / "values-monitoring.yaml",
    "no-discovery": HERE / "values-no-discovery.yaml",
}


# === rendering ===============================================================


def load_values(scenario: str) -> dict[str, Any]:
    path = SCENARIOS[scenario]
    return {} if path is None else yaml.safe_load(path.read_text()) or {}


def render_raw(
    values: dict[str, Any],
    *,
    chart_dir: Path = CHART,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """Render offline with the bundled Helm engine, as Kubernetes 1.33.

    helm-python-sdk 0.2.2's Chart.render() does not expose the engine's
    kube_version option, but the C ABI it wraps (helm_render) takes it in its
    options JSON and rejects unknown options, so we call that function with
    it: .Capabilities.KubeVersion is then v1.33.0 (test_engine_kube_version).
    """
    opts = {"name": name, "namespace": namespace, "kube_version": f"v{KUBE_VERSION}", "is_install": True}
    with helm.Chart.load(chart_dir) as chart:
        return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@functools.lru_cache(maxsize=None)
def _render_scenario(scenario: str) -> tuple[str, str]:
    rendered = render_raw(load_values(scenario))
    return json.dumps(rendered), json.dumps(documents(rendered))


def rendered_files(scenario: str) -> dict[str, str]:
    return json.loads(_render_scenario(scenario)[0])


def docs_of(scenario: str) -> list[dict[str, Any]]:
    return json.loads(_render_scenario(scenario)[1])


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d["metadata"]["name"])
    return out


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e.get("value") for e in container["env"]}


def injection_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cms = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    assert len(cms) == 1
    return yaml.safe_load(cms[0]["data"]["config.yaml"])


def discovery_enabled(scenario: str) -> bool:
    return load_values(scenario).get("discovery", {}).get("enabled", True)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# === schemas of the Prometheus Operator kinds ================================
# Written from prometheus-operator's CRDs (monitoring.coreos.com_servicemonitors
# and _podmonitors, v1): required fields and types, limited to the fields the
# chart may render, with additionalProperties false so a typo fails here. (The
# API server would prune an unknown field silently: the CRDs are not strict.)

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "minLength": 1},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
    },
}


def _monitor_schema(kind: str, endpoints_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", endpoints_key],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                    "jobLabel": {"type": "string"},
                },
            },
        },
    }


# From monitoring.coreos.com_prometheusrules (v1): spec.groups is a list
# keyed by name (x-kubernetes-list-type: map), each rule needs an expr and is
# either a recording or an alerting rule.
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"], "minLength": 1},
        "for": _DURATION,
        "keep_firing_for": {**_DURATION, "minLength": 1},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
}
_PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                    },
                },
            },
        },
    },
}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_schema("ServiceMonitor", "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_schema("PodMonitor", "podMetricsEndpoints"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _PROMETHEUS_RULE_SCHEMA,
}


def validate_document(doc: dict[str, Any]) -> None:
    """Raise unless the document is valid Kubernetes 1.33 (strict) or a known CRD kind."""
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        jsonschema.Draft7Validator(crd).validate(doc)
        return
    # SchemaNotFoundError (an unknown kind) is an error too.
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# === the engine and the validators themselves ================================


def test_engine_kube_version(tmp_path: Path) -> None:
    """The render option really sets .Capabilities.KubeVersion."""
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n"
    )
    docs = documents(render_raw({}, chart_dir=chart))
    assert docs[0]["data"]["kube"] == f"v{KUBE_VERSION}"


def test_validators_are_strict() -> None:
    """A typo in a container, or in a ServiceMonitor endpoint, is refused."""
    deployment = copy.deepcopy(one(docs_of("default"), "Deployment"))
    validate_document(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_document(deployment)
    monitor = copy.deepcopy(one(docs_of("monitoring"), "ServiceMonitor"))
    validate_document(monitor)
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_document(monitor)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_document({"apiVersion": "example.org/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert (meta["name"], meta["version"], meta["appVersion"]) == ("palisade", "0.1.0", "0.1.0")
    # Native sidecars (restartPolicy: Always init containers) need 1.29.
    assert meta["kubeVersion"] == ">=1.29.0-0"


# === every scenario ==========================================================


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(scenario: str) -> None:
    report = helm.lint(
        CHART, load_values(scenario), strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_documents_valid_for_kubernetes_1_33(scenario: str) -> None:
    docs = docs_of(scenario)
    assert docs
    for doc in docs:
        try:
            validate_document(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(e.message)


EXPECTED_OBJECTS = {
    "ServiceAccount": ["palisade-control-plane"],
    "ClusterRole": ["palisade-control-plane"],
    "ClusterRoleBinding": ["palisade-control-plane"],
    "Deployment": ["palisade-control-plane"],
    "Service": ["palisade-control-plane"],
    "ConfigMap": ["palisade-injection"],
    "MutatingWebhookConfiguration": ["palisade-sidecar-injector"],
    "CustomResourceDefinition": ["inboundpolicies.policy.palisade.io", "identitydenylists.policy.palisade.io"],
}


@pytest.mark.parametrize(
    "scenario,extra",
    [
        ("default", {"Secret": ["palisade-ca"]}),
        ("ha", {"Secret": ["palisade-ca"], "PodDisruptionBudget": ["palisade-control-plane"]}),
        ("byo-ca", {}),
        (
            "monitoring",
            {
                "Secret": ["palisade-ca"],
                "PodDisruptionBudget": ["palisade-control-plane"],
                "ServiceMonitor": ["palisade-control-plane"],
                "PodMonitor": ["palisade-sidecars"],
                "PrometheusRule": ["palisade-rules"],
            },
        ),
        ("no-discovery", {"Secret": ["palisade-ca"]}),
    ],
)
def test_objects_and_namespaces(scenario: str, extra: dict[str, list[str]]) -> None:
    docs = docs_of(scenario)
    assert kinds(docs) == {**EXPECTED_OBJECTS, **extra}
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "CustomResourceDefinition"}
    for d in docs:
        meta = d["metadata"]
        if d["kind"] in cluster_scoped:
            assert "namespace" not in meta, d["kind"]
        else:
            assert meta["namespace"] == NAMESPACE, d["kind"]
        if d["kind"] == "CustomResourceDefinition":
            # Rendered verbatim from the generated file (test_crds_are_the_generated_file).
            continue
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "palisade"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "palisade-0.1.0"


# The exact permissions of the control plane: (apiGroup, resource, verb, resourceName).
EXPECTED_RBAC = {
    ("authentication.k8s.io", "tokenreviews", "create", None),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "get", "palisade-sidecar-injector"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch", "palisade-sidecar-injector"),
    ("", "namespaces", "list", None),
    ("", "configmaps", "create", None),
    ("", "configmaps", "get", "palisade-trust-bundle"),
    ("", "configmaps", "patch", "palisade-trust-bundle"),
}
# With discovery.enabled: one cluster-wide watcher per kind, read-only.
DISCOVERY_RBAC = {
    ("", "pods", "list", None),
    ("", "pods", "watch", None),
    ("", "services", "list", None),
    ("", "services", "watch", None),
    ("discovery.k8s.io", "endpointslices", "list", None),
    ("discovery.k8s.io", "endpointslices", "watch", None),
    ("policy.palisade.io", "inboundpolicies", "list", None),
    ("policy.palisade.io", "inboundpolicies", "watch", None),
    ("policy.palisade.io", "identitydenylists", "list", None),
    ("policy.palisade.io", "identitydenylists", "watch", None),
    # Which namespaces enforce the mesh, for the webhook's posture checks.
    ("", "namespaces", "watch", None),
}
# The one rule discovery adds for the policy resources, as written.
POLICY_RULE = {
    "apiGroups": ["policy.palisade.io"],
    "resources": ["inboundpolicies", "identitydenylists"],
    "verbs": ["list", "watch"],
}


def rbac_grants(role: dict[str, Any]) -> set[tuple[str, str, str, str | None]]:
    grants = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        grants.add((group, resource, verb, name))
    return grants


@pytest.mark.parametrize("scenario", ["default", "ha", "byo-ca", "no-discovery"])
def test_rbac_is_exactly_what_the_control_plane_calls(scenario: str) -> None:
    docs = docs_of(scenario)
    role = one(docs, "ClusterRole")
    grants = rbac_grants(role)
    assert grants == EXPECTED_RBAC | (DISCOVERY_RBAC if discovery_enabled(scenario) else set())
    assert not any("secrets" in g or "*" in g for g in grants)
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_on_pods_is_list_and_watch_only_with_discovery(scenario: str) -> None:
    """Discovery reads Pods, Services, EndpointSlices, the policies and Namespaces cluster-wide and nothing more;
    without it, only the list of Namespaces the trust bundle needs."""
    grants = rbac_grants(one(docs_of(scenario), "ClusterRole"))
    # Subresources too (pods/log, pods/exec, inboundpolicies/status): nothing that starts with their names.
    watched = ("pods", "services", "endpointslices", "inboundpolicies", "identitydenylists", "namespaces")
    on_them = {g for g in grants if g[1].split("/")[0] in watched}
    if discovery_enabled(scenario):
        assert on_them == DISCOVERY_RBAC | {("", "namespaces", "list", None)}
    else:
        assert on_them == {("", "namespaces", "list", None)}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_on_policies_is_one_rule_with_discovery(scenario: str) -> None:
    """The policy resources cost exactly one rule: list and watch, no get, no status, nothing else in the group."""
    rules = one(docs_of(scenario), "ClusterRole")["rules"]
    policy_rules = [r for r in rules if "policy.palisade.io" in r["apiGroups"]
                    or {"inboundpolicies", "identitydenylists"} & {x.split("/")[0] for x in r["resources"]}]
    assert policy_rules == ([POLICY_RULE] if discovery_enabled(scenario) else [])
    without = one(docs_of("no-discovery"), "ClusterRole")["rules"]
    # Discovery adds three rules: pods and services, endpointslices, the policies.
    assert len(rules) == len(without) + (3 if discovery_enabled(scenario) else 0)


def test_rbac_follows_the_names() -> None:
    docs = docs_of("monitoring")
    grants = rbac_grants(one(docs, "ClusterRole"))
    assert ("", "configmaps", "get", "mesh-roots") in grants
    assert ("", "configmaps", "patch", "mesh-roots") in grants
    assert env_of(one(docs, "Deployment"))["PALISADE_BUNDLE_CONFIGMAP"] == "mesh-roots"
    assert injection_config(docs)["bundleConfigMap"] == "mesh-roots"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_control_plane_pod_is_locked_down(scenario: str) -> None:
    docs = docs_of(scenario)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc and "add" not in sc["capabilities"]
    # The template labels keep the control plane out of the injector.
    assert pod_labels(deployment)["palisade.io/inject"] == "disabled"
    # kubelet must not kill the process while it drains.
    grace = int(env_of(deployment)["PALISADE_SHUTDOWN_GRACE"].removesuffix("s"))
    assert pod["terminationGracePeriodSeconds"] > grace
    # Rolling updates add a pod before removing one.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container_port(deployment: dict[str, Any], name_or_number: str | int) -> int:
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    if isinstance(name_or_number, int):
        assert name_or_number in [p["containerPort"] for p in ports]
        return name_or_number
    (port,) = [p["containerPort"] for p in ports if p["name"] == name_or_number]
    return port


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_and_ports(scenario: str) -> None:
    docs = docs_of(scenario)
    deployment = one(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and container_port(deployment, ready["port"]) == 15014
    assert live["path"] == "/live" and container_port(deployment, live["port"]) == 15014
    assert ready.get("scheme", "HTTP") == "HTTP"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 15012,
        "http-admin": 15014,
        "https-webhook": 15017,
    }
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert matches(service["spec"]["selector"], pod_labels(deployment))
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    served = {p["name"]: (p["port"], container_port(deployment, p["targetPort"])) for p in service["spec"]["ports"]}
    assert served == {"grpc": (15012, 15012), "http-admin": (15014, 15014), "https-webhook": (15017, 15017)}


EXPECTED_ENV = {
    "PALISADE_CA_DIR",
    "PALISADE_TRUST_DOMAIN",
    "PALISADE_AUTHENTICATOR",
    "PALISADE_TOKEN_AUDIENCE",
    "PALISADE_GRPC_ADDR",
    "PALISADE_ADMIN_ADDR",
    "PALISADE_WEBHOOK_ADDR",
    "PALISADE_SERVER_NAMES",
    "PALISADE_INJECTION_CONFIG",
    "PALISADE_WEBHOOK_CONFIGURATION",
    "PALISADE_BUNDLE_CONFIGMAP",
    "PALISADE_DEFAULT_LIFETIME",
    "PALISADE_MIN_LIFETIME",
    "PALISADE_MAX_LIFETIME",
    "PALISADE_SHUTDOWN_GRACE",
    "PALISADE_LOG_LEVEL",
    "PALISADE_LOG_FORMAT",
}
# With discovery.enabled only.
DISCOVERY_ENV = {"PALISADE_DISCOVERY_SOURCE", "PALISADE_POLICY_DEFAULT_MODE", "PALISADE_POLICY_DEFAULT_ACTION"}


def mounts_by_path(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there (read-only mounts only)."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in pod["containers"][0]["volumeMounts"]:
        assert m.get("readOnly") is True, m
        out[m["mountPath"]] = volumes[m["name"]]
    return out


def test_environment_default() -> None:
    docs = docs_of("default")
    deployment = one(docs, "Deployment")
    env = env_of(deployment)
    assert set(env) == EXPECTED_ENV | DISCOVERY_ENV
    assert env == {
        "PALISADE_CA_DIR": "/etc/palisade/ca",
        "PALISADE_TRUST_DOMAIN": "cluster.local",
        "PALISADE_AUTHENTICATOR": "kubernetes",
        "PALISADE_TOKEN_AUDIENCE": "palisade",
        "PALISADE_GRPC_ADDR": "0.0.0.0:15012",
        "PALISADE_ADMIN_ADDR": "0.0.0.0:15014",
        "PALISADE_WEBHOOK_ADDR": "0.0.0.0:15017",
        "PALISADE_SERVER_NAMES": "palisade-control-plane,palisade-control-plane.palisade-system,"
        "palisade-control-plane.palisade-system.svc,palisade-control-plane.palisade-system.svc.cluster.local",
        "PALISADE_INJECTION_CONFIG": "/etc/palisade/injection/config.yaml",
        "PALISADE_WEBHOOK_CONFIGURATION": "palisade-sidecar-injector",
        "PALISADE_BUNDLE_CONFIGMAP": "palisade-trust-bundle",
        "PALISADE_DEFAULT_LIFETIME": "1h",
        "PALISADE_MIN_LIFETIME": "60s",
        "PALISADE_MAX_LIFETIME": "24h",
        "PALISADE_SHUTDOWN_GRACE": "15s",
        "PALISADE_LOG_LEVEL": "info",
        "PALISADE_LOG_FORMAT": "text",
        "PALISADE_DISCOVERY_SOURCE": "kubernetes",
        "PALISADE_POLICY_DEFAULT_MODE": "permissive",
        "PALISADE_POLICY_DEFAULT_ACTION": "allow",
    }
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/palisade-mesh/palisade-control-plane:0.1.0"
    assert deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_environment_agrees_with_the_other_objects(scenario: str) -> None:
    docs = docs_of(scenario)
    deployment = one(docs, "Deployment")
    env = env_of(deployment)
    assert EXPECTED_ENV <= set(env)
    # The control plane watches Pods exactly when its ClusterRole lets it,
    # and the sidecars open the stream exactly when it serves one.
    enabled = discovery_enabled(scenario)
    assert (env.get("PALISADE_DISCOVERY_SOURCE") == "kubernetes") is enabled
    assert ("PALISADE_DISCOVERY_SOURCE" in env) is enabled, "discovery off is the binary's default: not set"
    assert "PALISADE_DISCOVERY_FILE" not in env
    assert bool(DISCOVERY_RBAC & rbac_grants(one(docs, "ClusterRole"))) is enabled
    assert injection_config(docs)["sidecar"]["discovery"] is enabled
    # The policy default the control plane sends is the one the injector
    # gives the sidecars until their policy arrives.
    sidecar = injection_config(docs)["sidecar"]
    if enabled:
        assert env["PALISADE_POLICY_DEFAULT_MODE"] == sidecar["inboundMode"]
        assert env["PALISADE_POLICY_DEFAULT_ACTION"] == sidecar["defaultAction"]
    else:
        assert not {"PALISADE_POLICY_DEFAULT_MODE", "PALISADE_POLICY_DEFAULT_ACTION"} & set(env)
    service = one(docs, "Service")["metadata"]["name"]
    names = env["PALISADE_SERVER_NAMES"].split(",")
    assert names[:3] == [service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc"]
    assert re.fullmatch(rf"{service}\.{NAMESPACE}\.svc\.[a-z0-9.-]+", names[3])
    assert env["PALISADE_WEBHOOK_CONFIGURATION"] == one(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
    mounts = mounts_by_path(deployment)
    # The CA Secret and the injection ConfigMap are where the env vars point.
    ca_volume = mounts[env["PALISADE_CA_DIR"]]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    expected_secret = secrets[0]["metadata"]["name"] if secrets else load_values(scenario)["ca"]["existingSecret"]
    assert ca_volume["secret"]["secretName"] == expected_secret
    config_dir, config_file = env["PALISADE_INJECTION_CONFIG"].rsplit("/", 1)
    assert config_file == "config.yaml"
    assert mounts[config_dir]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    # The injected sidecars talk to this Service, by a name in its certificate.
    config = injection_config(docs)
    assert config["controlPlane"]["serverName"] in names
    assert config["controlPlane"]["address"] == f"https://{service}.{NAMESPACE}.svc:15012"
    assert config["token"]["audience"] == env["PALISADE_TOKEN_AUDIENCE"]
    assert config["bundleConfigMap"] == env["PALISADE_BUNDLE_CONFIGMAP"]


def test_environment_of_the_uncommon_knobs() -> None:
    deployment = one(docs_of("monitoring"), "Deployment")
    env = env_of(deployment)
    assert env["PALISADE_GRPC_ADDR"] == "[::]:15012"
    assert env["PALISADE_WEBHOOK_ADDR"] == "[::]:15017"
    assert env["PALISADE_TRUST_DOMAIN"] == "mesh.example.org"
    assert env["PALISADE_SERVER_NAMES"].endswith(".svc.k8s.example.org")
    assert env["PALISADE_LOG_FORMAT"] == "json"
    assert env["PALISADE_SHUTDOWN_GRACE"] == "20s"
    assert env["PALISADE_KUBE_TIMEOUT"] == "3s"
    assert env["PALISADE_POLICY_DEFAULT_MODE"] == "strict"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == [{"key": "CriticalAddonsOnly", "operator": "Exists"}]
    # Helm merges maps: the default kubernetes.io/os stays unless set to null.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "node-role.example.org/system": "true"}
    assert pod["containers"][0]["image"] == (
        "ghcr.io/palisade-mesh/palisade-control-plane@sha256:" + "0123456789abcdef" * 4
    )
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"]["example.org/team"] == "security"
    assert meta["labels"]["example.org/tier"] == "platform"
    assert deployment["spec"]["replicas"] == 2


# === the webhook =============================================================


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_webhook(scenario: str) -> None:
    docs = docs_of(scenario)
    values = load_values(scenario)
    config = one(docs, "MutatingWebhookConfiguration")
    inject, enforce = config["webhooks"]
    assert (inject["name"], enforce["name"]) == ("inject.palisade.io", "enforce.palisade.io")
    service = one(docs, "Service")
    webhook_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["https-webhook"]
    pods = {
        "operations": ["CREATE"],
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "resources": ["pods"],
        "scope": "Namespaced",
    }
    expected = values.get("webhook", {})
    secrets = [d for d in docs if d["kind"] == "Secret"]
    for hook, path in [(inject, "/inject"), (enforce, "/enforce")]:
        assert hook["clientConfig"]["service"] == {
            "name": service["metadata"]["name"],
            "namespace": NAMESPACE,
            "path": path,
            "port": webhook_port,
        }
        assert hook["sideEffects"] == "NoneOnDryRun"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["reinvocationPolicy"] == "Never"
        assert hook["timeoutSeconds"] == expected.get("timeoutSeconds", 10)
        if secrets:
            # A chart-made CA: the root is there from the first second.
            assert hook["clientConfig"]["caBundle"] == secrets[0]["data"]["ca.crt"]
        else:
            # Bring your own: the control plane fills it in; the chart never does.
            assert "caBundle" not in hook["clientConfig"]
    # Opted-in namespaces go to exactly one entry: /enforce where they also
    # enforce the mesh. The control plane's own namespace to neither.
    for hook, operator in [(inject, "NotIn"), (enforce, "In")]:
        assert hook["namespaceSelector"] == {
            "matchLabels": {"palisade.io/inject": "enabled"},
            "matchExpressions": [
                {"key": "palisade.io/enforce", "operator": operator, "values": ["true"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE]},
            ],
        }
    assert inject["rules"] == [pods]
    # kubectl debug goes through pods/ephemeralcontainers.
    assert enforce["rules"] == [
        pods,
        {**pods, "operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]},
    ]
    # A pod opts out only where the namespace does not enforce the mesh;
    # there every pod reaches the webhook, which refuses the opt-out.
    assert inject["objectSelector"] == {
        "matchExpressions": [{"key": "palisade.io/inject", "operator": "NotIn", "values": ["disabled", "false"]}]
    }
    assert "objectSelector" not in enforce
    # The control plane's own pods are never selected.
    deployment = one(docs, "Deployment")
    assert pod_labels(deployment)["palisade.io/inject"] in ("disabled", "false")
    assert inject["failurePolicy"] == expected.get("failurePolicy", "Fail")
    # An enforcing namespace never starts a pod unjudged.
    assert enforce["failurePolicy"] == "Fail"


def test_an_enforcing_namespace_fails_closed_even_with_failure_policy_ignore() -> None:
    hooks = one(documents(render_raw({"webhook": {"failurePolicy": "Ignore"}})), "MutatingWebhookConfiguration")
    assert [h["failurePolicy"] for h in hooks["webhooks"]] == ["Ignore", "Fail"]


# === the CA ==================================================================


def openssl(*args: str, stdin: bytes) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout.decode()


@pytest.mark.parametrize("scenario", ["default", "ha", "monitoring"])
def test_chart_created_ca(scenario: str, tmp_path: Path) -> None:
    docs = docs_of(scenario)
    secret = one(docs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    crt = base64.b64decode(secret["data"]["tls.crt"])
    key = base64.b64decode(secret["data"]["tls.key"])
    assert base64.b64decode(secret["data"]["ca.crt"]) == crt, "a fresh root is its own bundle"
    text = openssl("x509", "-noout", "-text", stdin=crt)
    assert re.search(r"X509v3 Basic Constraints: critical\s+CA:TRUE", text), text
    assert re.search(r"X509v3 Key Usage: critical\s+.*Certificate Sign", text), text
    assert "NIST CURVE: P-256" in text
    assert "CN = Palisade root CA" in text
    # About ten years.
    dates = openssl("x509", "-noout", "-startdate", "-enddate", stdin=crt)
    start = int(re.search(r"notBefore=.* (\d{4}) GMT", dates).group(1))
    end = int(re.search(r"notAfter=.* (\d{4}) GMT", dates).group(1))
    assert end - start in (9, 10)
    # The key belongs to the certificate.
    assert openssl("x509", "-noout", "-pubkey", stdin=crt) == openssl("pkey", "-pubout", stdin=key)
    # It verifies as a self-signed root.
    (tmp_path / "ca.crt").write_bytes(crt)
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "ca.crt")], check=True,
                   capture_output=True)


def test_each_render_without_a_cluster_makes_a_new_root() -> None:
    """Offline (helm template) nothing can be looked up; in a cluster the Secret is kept (next test)."""
    first = one(documents(render_raw({})), "Secret")["data"]["tls.key"]
    second = one(documents(render_raw({})), "Secret")["data"]["tls.key"]
    assert first != second


def render_against(api: StandIn, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Renders as `helm install/upgrade` would, with `lookup` asking the stand-in API server."""
    with helm.Config(kubeconfig_path=api.kubeconfig, namespace=NAMESPACE) as config:
        with helm.Chart.load(CHART) as chart:
            return documents(config.render(chart, values, name=RELEASE, namespace=NAMESPACE))


def test_upgrade_keeps_the_existing_root(tmp_path: Path) -> None:
    """On upgrade (the Secret exists) the root, key and bundle are kept byte for byte.

    The Secret below is what an operator leaves after step 1 of a rotation:
    two roots in ca.crt. The next `helm upgrade` must not undo it.
    """
    data = {
        "tls.crt": base64.b64encode(b"-----BEGIN CERTIFICATE-----\nissuer\n").decode(),
        "tls.key": base64.b64encode(b"-----BEGIN PRIVATE KEY-----\nkey\n").decode(),
        "ca.crt": base64.b64encode(b"-----BEGIN CERTIFICATE-----\nold root\nnew root\n").decode(),
    }
    existing = {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "palisade-ca", "namespace": NAMESPACE}, "data": data,
    }
    with StandIn(tmp_path, objects=[existing]) as api:
        docs = render_against(api, {})
    assert one(docs, "Secret")["data"] == data
    hook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["clientConfig"]["caBundle"] == data["ca.crt"]


def test_install_generates_when_no_secret_exists(tmp_path: Path) -> None:
    with StandIn(tmp_path) as api:
        docs = render_against(api, {})
        asked = [(r["path"], r["status"]) for r in api.requests()]
    assert (f"/api/v1/namespaces/{NAMESPACE}/secrets/palisade-ca", 404) in asked, f"lookup never asked: {asked}"
    secret = one(docs, "Secret")
    text = openssl("x509", "-noout", "-text", stdin=base64.b64decode(secret["data"]["tls.crt"]))
    assert "CA:TRUE" in text


def test_bring_your_own_ca() -> None:
    docs = docs_of("byo-ca")
    assert not [d for d in docs if d["kind"] == "Secret"]
    deployment = one(docs, "Deployment")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "ca", "secret": {"secretName": "mesh-issuer", "defaultMode": 0o440}} in volumes


# === the injection config ====================================================

INJECTION_KEYS = {
    "sidecar": {
        "image", "imagePullPolicy", "resources", "logLevel", "inboundMode", "defaultAction", "discovery", "outboundMode",
        "excludeOutboundPorts", "excludeInboundPorts", "serverFirstPorts", "meshNetworks", "accessLog",
    },
    "init": {"image", "imagePullPolicy", "resources"},
    "controlPlane": {"address", "serverName"},
    "token": {"audience", "expirationSeconds"},
}


def test_injection_config_default() -> None:
    config = injection_config(docs_of("default"))
    assert set(config) == set(INJECTION_KEYS) | {"bundleConfigMap", "prometheusScrape"}
    for section, keys in INJECTION_KEYS.items():
        assert set(config[section]) == keys, section
    assert config == {
        "sidecar": {
            "image": "ghcr.io/palisade-mesh/palisade-sidecar:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "128Mi"}},
            "logLevel": "info",
            "inboundMode": "permissive",
            "defaultAction": "allow",
            "discovery": True,
            "outboundMode": "permissive",
            "excludeOutboundPorts": [53],
            "excludeInboundPorts": [],
            "serverFirstPorts": [3306, 5432, 6379, 25, 110, 143],
            "meshNetworks": [],
            "accessLog": "off",
        },
        "init": {
            "image": "ghcr.io/palisade-mesh/palisade-init:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        },
        "controlPlane": {
            "address": "https://palisade-control-plane.palisade-system.svc:15012",
            "serverName": "palisade-control-plane.palisade-system.svc",
        },
        "token": {"audience": "palisade", "expirationSeconds": 600},
        "bundleConfigMap": "palisade-trust-bundle",
        "prometheusScrape": True,
    }


def test_injection_config_of_the_uncommon_knobs() -> None:
    config = injection_config(docs_of("monitoring"))
    sidecar = config["sidecar"]
    assert set(sidecar) == INJECTION_KEYS["sidecar"] | {"lifetime"}
    assert sidecar["lifetime"] == "30m"
    assert sidecar["image"] == "ghcr.io/palisade-mesh/palisade-sidecar:0.1.1"
    assert sidecar["inboundMode"] == "strict"
    assert sidecar["outboundMode"] == "strict"
    assert sidecar["discovery"] is True
    assert sidecar["meshNetworks"] == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert sidecar["excludeInboundPorts"] == [9090]
    assert sidecar["accessLog"] == "json"
    assert config["init"]["image"] == "ghcr.io/palisade-mesh/palisade-init@sha256:" + "fedcba9876543210" * 4
    assert config["token"]["expirationSeconds"] == 3600
    assert config["prometheusScrape"] is False


def test_injection_config_without_discovery() -> None:
    sidecar = injection_config(docs_of("no-discovery"))["sidecar"]
    assert set(sidecar) == INJECTION_KEYS["sidecar"]
    assert sidecar["discovery"] is False
    assert sidecar["outboundMode"] == "permissive"


def test_injection_config_change_rolls_the_control_plane() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(documents(render_raw(values)), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/injection-config"]

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({}) == base
    assert checksum({"injection": {"sidecar": {"logLevel": "debug"}}}) != base


# === HA ======================================================================


def test_ha() -> None:
    docs = docs_of("ha")
    deployment = one(docs, "Deployment")
    labels = pod_labels(deployment)
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert matches(term["podAffinityTerm"]["labelSelector"]["matchLabels"], labels)
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    host = spread["kubernetes.io/hostname"]
    assert host["maxSkew"] == 1 and host["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        # The chart fills in the pods' own labels.
        assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)


def test_pdb_min_available() -> None:
    pdb = one(docs_of("monitoring"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


# === monitoring ==============================================================


def test_monitors() -> None:
    docs = docs_of("monitoring")
    service = one(docs, "Service")
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert matches(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "http-admin", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["selector"] == {"matchLabels": {"palisade.io/sidecar": "injected"}}
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "palisade-admin", "path": "/metrics", "interval": "1m"}]


def test_monitoring_off_by_default() -> None:
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & set(kinds(docs_of("default")))


RULES_FILE = REPO / "deploy" / "prometheus" / "palisade-rules.yaml"
CHART_RULES_FILE = CHART / "files" / "palisade-rules.yaml"


def test_chart_rules_are_a_copy_of_the_rule_file() -> None:
    """Helm reads only files inside the chart: files/palisade-rules.yaml must be the shipped file."""
    assert CHART_RULES_FILE.read_bytes() == RULES_FILE.read_bytes(), (
        "helm/palisade/files/palisade-rules.yaml differs from deploy/prometheus/palisade-rules.yaml: "
        "cp deploy/prometheus/palisade-rules.yaml helm/palisade/files/"
    )


def test_prometheus_rule() -> None:
    docs = docs_of("monitoring")
    rule = one(docs, "PrometheusRule")
    labels = rule["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["example.org/team"] == "platform"
    assert labels["app.kubernetes.io/component"] == "monitoring"
    # Exactly the groups of the rule file, templates untouched by Helm.
    expected = yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert rule["spec"] == {"groups": expected}
    annotations = [
        text for g in rule["spec"]["groups"] for r in g["rules"] for text in (r.get("annotations") or {}).values()
    ]
    assert any("{{ $labels.identity }}" in t for t in annotations)
    assert any("{{ $value | humanizeDuration }}" in t for t in annotations)
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names are the list's map keys"


def test_prometheus_rule_validator_is_strict() -> None:
    rule = copy.deepcopy(one(docs_of("monitoring"), "PrometheusRule"))
    validate_document(rule)
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["exprr"] = "up"
    with pytest.raises(jsonschema.ValidationError):
        validate_document(broken)
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate_document(broken)
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["alert"] = "Both"  # a recording rule named as an alert
    with pytest.raises(jsonschema.ValidationError):
        validate_document(broken)


def test_prometheus_rule_follows_the_release() -> None:
    docs = documents(render_raw({"monitoring": {"prometheusRule": {"enabled": True, "labels": {}}}},
                                name="mesh", namespace="mesh-system"))
    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["name"] == "mesh-palisade-rules"
    assert rule["metadata"]["namespace"] == "mesh-system"
    assert "release" not in rule["metadata"]["labels"]


# === authorization policies ==================================================

CRDS_FILE = CHART / "files" / "crds.yaml"
# CRD name -> (kind, scope, the spec properties users write).
POLICY_CRDS = {
    "inboundpolicies.policy.palisade.io": (
        "InboundPolicy", "Namespaced",
        {"podSelector", "mode", "defaultAction", "rules", "enforcement", "excludablePorts"},
    ),
    "identitydenylists.policy.palisade.io": ("IdentityDenyList", "Cluster", {"identities", "namespaces"}),
}


def crds_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "CustomResourceDefinition"]


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def undescribed(node: dict[str, Any], path: str = "", parent_described: bool = False) -> list[str]:
    """Schema paths with no description that are not leaves of a described parent."""
    children = [(f"{path}.{k}", v) for k, v in node.get("properties", {}).items()]
    for key, suffix in (("items", "[]"), ("additionalProperties", ".*")):
        if isinstance(node.get(key), dict):
            children.append((f"{path}{suffix}", node[key]))
    described = bool(node.get("description"))
    out = [] if described or (parent_described and not children) else [path or "."]
    for child_path, child in children:
        out += undescribed(child, child_path, described)
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crds_are_the_generated_file(scenario: str) -> None:
    """Exactly the two documents of files/crds.yaml (the Rust test checks it is what the code generates)."""
    expected = [d for d in yaml.safe_load_all(CRDS_FILE.read_text()) if d]
    assert [d["metadata"]["name"] for d in expected] == list(POLICY_CRDS)
    assert crds_of(docs_of(scenario)) == expected
    # Verbatim, not templated: nothing in the file is read as a template.
    assert rendered_files(scenario)["palisade/templates/crds.yaml"].strip() == CRDS_FILE.read_text().strip()


def test_crds_are_valid_kubernetes_1_33() -> None:
    crds = crds_of(docs_of("default"))
    assert len(crds) == 2
    for crd in crds:
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    broken = copy.deepcopy(crds[0])
    broken["spec"]["versions"][0]["servedd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", POLICY_CRDS)
def test_crd_shape(name: str) -> None:
    kind, scope, fields = POLICY_CRDS[name]
    (crd,) = [d for d in crds_of(docs_of("default")) if d["metadata"]["name"] == name]
    # An uninstall must not delete every policy of the mesh.
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    spec = crd["spec"]
    assert spec["group"] == "policy.palisade.io"
    assert (spec["names"]["kind"], spec["names"]["plural"], spec["scope"]) == (kind, name.split(".")[0], scope)
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    schema = crd_schema(crd)
    properties = schema["properties"]["spec"]["properties"]
    assert fields <= set(properties), f"{kind} lacks {fields - set(properties)}"
    assert undescribed(schema) == [], f"{kind}: no description at {undescribed(schema)}"
    # kubectl get shows columns, each pointing at a field the schema has.
    columns = version["additionalPrinterColumns"]
    assert columns and {"Age"} <= {c["name"] for c in columns}
    for column in columns:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for part in parts:
            assert part in node.get("properties", {}), f"{kind} column {column['name']}: no {column['jsonPath']}"
            node = node["properties"][part]


def test_crd_defaults_agree_with_the_values() -> None:
    """A policy's mode and defaultAction take the values the chart's mesh default takes (or none: the default)."""
    values_schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    (crd,) = [d for d in crds_of(docs_of("default")) if d["spec"]["names"]["kind"] == "InboundPolicy"]
    spec = crd_schema(crd)["properties"]["spec"]["properties"]
    inbound_mode = values_schema["injection"]["properties"]["sidecar"]["properties"]["inboundMode"]
    assert set(spec["mode"]["enum"]) == set(inbound_mode["enum"]) | {None}
    assert set(spec["defaultAction"]["enum"]) == set(values_schema["policy"]["properties"]["defaultAction"]["enum"]) | {None}


def test_install_crds_false_renders_no_crd() -> None:
    rendered = render_raw({"policy": {"installCRDs": False}})
    assert rendered.get("palisade/templates/crds.yaml", "").strip() == ""
    docs = documents(rendered)
    assert crds_of(docs) == []
    # The control plane still watches the policies: the CRDs are yours to install.
    assert POLICY_RULE in one(docs, "ClusterRole")["rules"]


def test_default_action_deny_reaches_the_control_plane_and_the_sidecars() -> None:
    docs = documents(render_raw({"policy": {"defaultAction": "deny"},
                                 "injection": {"sidecar": {"inboundMode": "strict"}}}))
    env = env_of(one(docs, "Deployment"))
    assert env["PALISADE_POLICY_DEFAULT_ACTION"] == "deny"
    assert env["PALISADE_POLICY_DEFAULT_MODE"] == "strict"
    sidecar = injection_config(docs)["sidecar"]
    assert (sidecar["defaultAction"], sidecar["inboundMode"]) == ("deny", "strict")
    # Without discovery no policy is delivered, but the sidecars keep the default.
    docs = documents(render_raw({"policy": {"defaultAction": "deny"}, "discovery": {"enabled": False}}))
    assert "PALISADE_POLICY_DEFAULT_ACTION" not in env_of(one(docs, "Deployment"))
    assert injection_config(docs)["sidecar"]["defaultAction"] == "deny"


def strict_schema(node: Any) -> Any:
    """The CRD schema with unknown fields refused (the API server would prune them silently)."""
    if isinstance(node, dict):
        out = {k: strict_schema(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def test_readme_examples_fit_the_crds() -> None:
    """The examples of "Authorization policies" apply: right group, scope and fields."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("\n## Authorization policies\n", 1)[1].split("\n## ", 1)[0]
    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    crds = {d["spec"]["names"]["kind"]: d for d in crds_of(docs_of("default"))}
    assert sorted(e["kind"] for e in examples) == sorted(crds)
    for example in examples:
        crd = crds[example["kind"]]
        (version,) = crd["spec"]["versions"]
        assert example["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        assert ("namespace" in example["metadata"]) is (crd["spec"]["scope"] == "Namespaced")
        spec_schema = strict_schema(crd_schema(crd)["properties"]["spec"])
        jsonschema.Draft7Validator(spec_schema).validate(example["spec"])
    (policy,) = [e for e in examples if e["kind"] == "InboundPolicy"]
    assert policy["spec"]["enforcement"] == "audit"
    assert 'palisade_authz_decisions_total{decision="audit_deny"}' in section


# === names ===================================================================


def test_names_follow_the_release() -> None:
    docs = documents(render_raw({}, name="mesh", namespace="mesh-system"))
    names = kinds(docs)
    assert names["Deployment"] == ["mesh-palisade-control-plane"]
    assert names["MutatingWebhookConfiguration"] == ["mesh-palisade-sidecar-injector"]
    assert names["Secret"] == ["mesh-palisade-ca"]
    env = env_of(one(docs, "Deployment"))
    assert env["PALISADE_SERVER_NAMES"].split(",")[2] == "mesh-palisade-control-plane.mesh-system.svc"
    assert env["PALISADE_WEBHOOK_CONFIGURATION"] == "mesh-palisade-sidecar-injector"
    hook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["clientConfig"]["service"]["namespace"] == "mesh-system"
    assert ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch",
            "mesh-palisade-sidecar-injector") in rbac_grants(one(docs, "ClusterRole"))
    assert injection_config(docs)["controlPlane"]["serverName"] == "mesh-palisade-control-plane.mesh-system.svc"
    override = kinds(documents(render_raw({"fullnameOverride": "pal"})))
    assert override["Service"] == ["pal-control-plane"] and override["ConfigMap"] == ["pal-injection"]


# === values that must be refused =============================================

INVALID_VALUES = {
    "unknown top-level key": "replicaCount: 3\n",
    "unknown nested key": "controlPlane:\n  replica: 3\n",
    "failurePolicy Sometimes": "webhook:\n  failurePolicy: Sometimes\n",
    "replicas three": "controlPlane:\n  replicas: three\n",
    "replicas zero": "controlPlane:\n  replicas: 0\n",
    "timeoutSeconds 60": "webhook:\n  timeoutSeconds: 60\n",
    "timeoutSeconds 0": "webhook:\n  timeoutSeconds: 0\n",
    "expirationSeconds 300": "injection:\n  tokenExpirationSeconds: 300\n",
    "port 70000": "controlPlane:\n  ports:\n    grpc: 70000\n",
    "inboundMode lax": "injection:\n  sidecar:\n    inboundMode: lax\n",
    "outboundMode lax": "injection:\n  sidecar:\n    outboundMode: lax\n",
    "outboundMode Strict": "injection:\n  sidecar:\n    outboundMode: Strict\n",
    "discovery enabled yes-please": "discovery:\n  enabled: yes-please\n",
    "discovery source key": "discovery:\n  source: file\n",
    "logFormat xml": "controlPlane:\n  logFormat: xml\n",
    "pullPolicy Sometimes": "injection:\n  init:\n    image:\n      pullPolicy: Sometimes\n",
    "lifetime soon": "injection:\n  sidecar:\n    lifetime: soon\n",
    "digest not sha256": "controlPlane:\n  image:\n    digest: latest\n",
    "server-first port string": "injection:\n  sidecar:\n    serverFirstPorts: [mysql]\n",
    "both CA sources": "ca:\n  existingSecret: mesh-issuer\n",
    "no CA source": "ca:\n  create: false\n",
    "interval 30 seconds": "monitoring:\n  serviceMonitor:\n    interval: 30 seconds\n",
    "prometheusRule enabled yes-please": "monitoring:\n  prometheusRule:\n    enabled: yes-please\n",
    "prometheusRule label not a string": "monitoring:\n  prometheusRule:\n    labels:\n      release: [a, b]\n",
    "prometheusRule unknown key": "monitoring:\n  prometheusRule:\n    interval: 30s\n",
    "defaultAction maybe": "policy:\n  defaultAction: maybe\n",
    "defaultAction Deny": "policy:\n  defaultAction: Deny\n",
    "installCRDs yes-please": "policy:\n  installCRDs: yes-please\n",
    "policy unknown key": "policy:\n  defaultMode: strict\n",
}


@pytest.mark.parametrize("case", INVALID_VALUES)
def test_schema_refuses(case: str, tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(INVALID_VALUES[case])
    values = helm.values_from_yaml(values_file.read_text())
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render_raw(values)
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE)
    assert report["errors"], f"lint accepted {case}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_schema_accepts_the_shipped_values(scenario: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(load_values(scenario))


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart as `helm install --skip-schema-validation` sees it."""
    copy_dir = tmp_path_factory.mktemp("noschema") / "palisade"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    return copy_dir


@pytest.mark.parametrize(
    "values,message",
    [
        ({"ca": {"create": True, "existingSecret": "mesh-issuer"}}, "choose one CA source"),
        ({"ca": {"create": False, "existingSecret": ""}}, "no CA source"),
        ({"controlPlane": {"shutdownGraceSeconds": 30, "terminationGracePeriodSeconds": 30}}, "must be larger"),
        ({"controlPlane": {"extraEnv": [{"name": "PALISADE_CA_DIR", "value": "/tmp"}]}}, "set by the chart"),
        ({"controlPlane": {"extraEnv": [{"name": "PALISADE_DISCOVERY_SOURCE", "value": "file"}]}}, "set by the chart"),
        ({"controlPlane": {"extraEnv": [{"name": "PALISADE_POLICY_DEFAULT_ACTION", "value": "deny"}]}},
         "set by the chart"),
        ({"controlPlane": {"extraEnv": [{"name": "PALISADE_POLICY_DEFAULT_MODE", "value": "strict"}]}},
         "set by the chart"),
        (
            {"discovery": {"enabled": False}, "injection": {"sidecar": {"outboundMode": "strict"}}},
            "strict needs discovery.enabled=true",
        ),
    ],
)
def test_templates_refuse_without_the_schema(chart_without_schema: Path, values: dict, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render_raw(values, chart_dir=chart_without_schema)


# Definitions that are Kubernetes types (closed, but one value each).
KUBERNETES_TYPES = {"resources"}


def _schema_leaves(node: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of the values: the properties of the chart's own (closed) objects."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        if name in KUBERNETES_TYPES:
            return [prefix.rstrip(".")]
        node = defs[name]
    if node.get("type") == "object" and node.get("additionalProperties") is False:
        out = []
        for key, child in node["properties"].items():
            out += _schema_leaves(child, defs, f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")]


def test_schema_closes_every_object_and_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    leaves = _schema_leaves(schema, schema["definitions"])
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def lookup(path: str) -> Any:
        node: Any = defaults
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{path} is in the schema, not in values.yaml"
            node = node[part]
        return node

    for leaf in leaves:
        lookup(leaf)
    # Every default value is reachable through the schema's closed objects.
    def walk(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node and prefix.rstrip(".") not in leaves:
            return [p for k, v in node.items() for p in walk(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    assert sorted(walk(defaults)) == sorted(leaves)


def test_readme_documents_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = set(_schema_leaves(schema, schema["definitions"]))
    readme = (CHART / "README.md").read_text()
    table = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", table, flags=re.M))
    assert documented == leaves, f"undocumented: {leaves - documented}; unknown: {documented - leaves}"


def test_values_yaml_comments_every_value() -> None:
    """Every value in values.yaml has a comment line right above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = set(_schema_leaves(schema, schema["definitions"]))
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    seen = set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group(2)])
        stack.append((indent, m.group(2)))
        if path in leaves:
            seen.add(path)
            assert lines[i - 1].strip().startswith("#"), f"values.yaml line {i + 1}: {path} has no comment"
    assert seen == leaves


def test_notes_tell_how_to_enable_injection() -> None:
    notes = rendered_files("default")["palisade/templates/NOTES.txt"]
    assert "kubectl label namespace NAMESPACE palisade.io/inject=enabled" in notes
    assert "rollout restart" in notes
    assert "/metrics" in notes
