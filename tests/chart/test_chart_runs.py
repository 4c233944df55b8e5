"""The rendered chart and the real control-plane binary, together.

The chart's tests check the manifests; these check that what the chart hands
the control plane actually works with it: the Deployment's exact environment,
the chart-generated CA Secret and the injection ConfigMap are given to
`target/debug/palisade-control-plane` (built by tests/run.sh before pytest),
with KUBECONFIG pointing at the stand-in API server (`palisade-kube-stand-in`,
see kube_stand_in.py), which stores what the control plane writes. Then:

- the control plane writes the chart's root into the webhook's `caBundle`
  and the trust-bundle ConfigMap into the injection-enabled namespace;
- the webhook, reached the way the API server reaches it (HTTPS to the
  Service's DNS name, trusting only that `caBundle`), injects a pod with the
  chart's images and control-plane address, and the patch applies;
- every PALISADE_* variable the chart sets is one the binary reads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from kube_stand_in import StandIn
from test_chart import NAMESPACE, REPO, docs_of, env_of, injection_config, one

BINARY = REPO / "target" / "debug" / "palisade-control-plane"
FIXTURE = REPO / "tests" / "fixtures" / "admission" / "ordinary-pod.json"


@pytest.fixture(scope="module")
def binary() -> Path:
    assert BINARY.exists(), f"{BINARY} is missing: tests/run.sh builds it (cargo build --workspace --bins) before the chart tests"
    return BINARY


def wait_for(what: str, check, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_every_variable_the_chart_sets_is_read_by_the_binary(binary: Path) -> None:
    help_text = subprocess.run([binary, "serve", "--help"], check=True, capture_output=True, text=True).stdout
    for name in env_of(one(docs_of("default"), "Deployment")):
        if name.startswith("PALISADE_"):
            assert f"[env: {name}=" in help_text, f"the chart sets {name}, which palisade-control-plane serve does not read"


def test_the_control_plane_runs_with_what_the_chart_renders(binary: Path, tmp_path: Path) -> None:
    docs = docs_of("default")
    deployment = one(docs, "Deployment")
    secret = one(docs, "Secret")
    webhook_config = one(docs, "MutatingWebhookConfiguration")
    config = injection_config(docs)
    service = one(docs, "Service")

    # The Secret and the ConfigMap, as kubelet would mount them.
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (ca_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
    (ca_dir / "tls.key").chmod(0o600)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cm["data"]["config.yaml"])
    root_pem = (ca_dir / "ca.crt").read_text()

    # The chart may pre-fill caBundle; start from none, as with a bring-your-own CA.
    for webhook in webhook_config["webhooks"]:
        webhook["clientConfig"].pop("caBundle", None)
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"palisade.io/inject": "enabled"}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other", "labels": {}}},
    ]
    webhook_path = ("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
                    + webhook_config["metadata"]["name"])
    # The chart installs its CRDs; without them the policy watchers never
    # sync, and the webhook answers 503 until they do.
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert crds, "the chart installs its CRDs by default"
    with StandIn(tmp_path / "api", objects=[webhook_config, *namespaces, *crds], namespace=NAMESPACE) as api:
        kubeconfig = api.kubeconfig
        env = {k: v for k, v in env_of(deployment).items() if v is not None}
        env.update({
            "PALISADE_CA_DIR": str(ca_dir),
            "PALISADE_INJECTION_CONFIG": str(config_file),
            "PALISADE_GRPC_ADDR": "127.0.0.1:0",
            "PALISADE_ADMIN_ADDR": "127.0.0.1:0",
            "PALISADE_WEBHOOK_ADDR": "127.0.0.1:0",
            "KUBECONFIG": str(kubeconfig),
            "PATH": os.environ.get("PATH", ""),
        })
        args = deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])
        proc = subprocess.Popen([binary, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
            reader.start()
            serving = wait_for("the control plane to serve", lambda: next((l for l in lines if "serving grpc=" in l), None)
                               or (proc.poll() is not None and pytest.fail("exited:\n" + "".join(lines))))
            port = int(re.search(r"webhook=127\.0\.0\.1:(\d+)", serving).group(1))

            # The trust bundle reaches the API server and the namespace.
            def ca_bundles() -> list[str] | None:
                bundles = [w["clientConfig"].get("caBundle") for w in api.get(webhook_path)["webhooks"]]
                return bundles if all(bundles) else None
            bundles = wait_for("the webhook caBundle", ca_bundles)
            for b in bundles:
                assert base64.b64decode(b).decode().strip() == root_pem.strip()
            configmap = f"configmaps/{config['bundleConfigMap']}"
            written = wait_for("the trust bundle ConfigMap", lambda: api.get(f"/api/v1/namespaces/demo/{configmap}"))
            assert written["data"]["ca.crt"].strip() == root_pem.strip()
            assert api.get(f"/api/v1/namespaces/other/{configmap}") is None

            # How it asked: a JSON patch of the webhook, namespaces by label.
            requests = api.requests()
            patches = [r for r in requests if r["method"] == "PATCH" and r["path"] == webhook_path]
            assert patches and all(r["contentType"] == "application/json-patch+json" for r in patches), patches
            lists = [urllib.parse.parse_qs(r["query"]) for r in requests
                     if r["method"] == "GET" and r["path"] == "/api/v1/namespaces"]
            # The publisher lists by label; discovery lists and watches every
            # namespace, to learn which ones enforce the mesh.
            assert ["palisade.io/inject=enabled"] in [q.get("labelSelector") for q in lists], lists
            assert all(q.get("labelSelector") in (["palisade.io/inject=enabled"], None) for q in lists), lists
            assert any(q.get("watch") == ["true"] for q in lists), lists

            # The API server's call: HTTPS to <service>.<namespace>.svc, trusting the caBundle.
            host = f"{service['metadata']['name']}.{NAMESPACE}.svc"
            webhook_client = webhook_config["webhooks"][0]["clientConfig"]["service"]
            assert webhook_client["name"] == service["metadata"]["name"]
            ca_file = tmp_path / "caBundle.pem"
            ca_file.write_bytes(base64.b64decode(bundles[0]))
            out = subprocess.run(
                ["curl", "--silent", "--show-error", "--max-time", "10", "--cacert", str(ca_file),
                 "--resolve", f"{host}:{port}:127.0.0.1", "-H", "Content-Type: application/json",
                 "--data-binary", f"@{FIXTURE}", f"https://{host}:{port}{webhook_client['path']}"],
                check=True, capture_output=True, text=True)
            answer = json.loads(out.stdout)
            assert answer["response"]["allowed"] is True, answer
            patch = json.loads(base64.b64decode(answer["response"]["patch"]))
            review = json.loads(FIXTURE.read_text())
            pod = jsonpatch.JsonPatch(patch).apply(review["request"]["object"])
            containers = {c["name"]: c for c in pod["spec"]["initContainers"]}
            assert containers["palisade-sidecar"]["image"] == config["sidecar"]["image"]
            assert containers["palisade-init"]["image"] == config["init"]["image"]
            sidecar_env = {e["name"]: e.get("value") for e in containers["palisade-sidecar"]["env"]}
            assert sidecar_env["PALISADE_CONTROL_PLANE"] == config["controlPlane"]["address"]
            assert sidecar_env["PALISADE_CONTROL_PLANE_NAME"] == config["controlPlane"]["serverName"]
            # The name the sidecar expects is one the control plane's certificate carries.
            assert config["controlPlane"]["serverName"] in env["PALISADE_SERVER_NAMES"].split(",")
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert volumes["palisade-trust-bundle"]["configMap"]["name"] == config["bundleConfigMap"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
