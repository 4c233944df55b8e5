"""The rendered chart and the real control-plane binary, together.

The chart's tests check the manifests; these check that what the chart hands
the control plane actually works with it: the Deployment's exact environment,
the chart-generated CA Secret and the injection ConfigMap are given to
`target/debug/palisade-control-plane` (built by tests/run.sh before pytest),
with KUBECONFIG pointing at a loopback stand-in for the API server. Then:

- the control plane writes the chart's root into the webhook's `caBundle`
  and the trust-bundle ConfigMap into the injection-enabled namespace;
- the webhook, reached the way the API server reaches it (HTTPS to the
  Service's DNS name, trusting only that `caBundle`), injects a pod with the
  chart's images and control-plane address, and the patch applies;
- every PALISADE_* variable the chart sets is one the binary reads.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from test_chart import NAMESPACE, REPO, JsonHandler, docs_of, env_of, injection_config, one

BINARY = REPO / "target" / "debug" / "palisade-control-plane"
FIXTURE = REPO / "tests" / "fixtures" / "admission" / "ordinary-pod.json"


@pytest.fixture(scope="module")
def binary() -> Path:
    assert BINARY.exists(), f"{BINARY} is missing: tests/run.sh builds it (cargo build --workspace --bins) before the chart tests"
    return BINARY


class FakeApiServer:
    """The calls the control plane makes at start: the webhook configuration
    (get, JSON patch), namespaces (list by label), ConfigMaps (apply)."""

    def __init__(self, webhook: dict[str, Any], namespaces: list[dict[str, Any]]):
        self.webhook = webhook
        self.namespaces = namespaces
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()
        outer = self
        webhook_path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{webhook['metadata']['name']}"

        class Handler(JsonHandler):
            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                with outer.lock:
                    if path == webhook_path:
                        return self._send(200, outer.webhook)
                    if path == "/api/v1/namespaces":
                        assert "labelSelector=palisade.io%2Finject%3Denabled" in query, query
                        items = [n for n in outer.namespaces if n["metadata"]["labels"].get("palisade.io/inject") == "enabled"]
                        return self._send(200, {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items})
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

            def do_PATCH(self) -> None:
                path, _, _ = self.path.partition("?")
                body = self._body()
                with outer.lock:
                    if path == webhook_path:
                        assert self.headers["Content-Type"] == "application/json-patch+json"
                        outer.webhook = jsonpatch.JsonPatch(json.loads(body)).apply(outer.webhook)
                        return self._send(200, outer.webhook)
                    m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps/([^/]+)", path)
                    if m:
                        doc = json.loads(body)
                        outer.configmaps[(m.group(1), m.group(2))] = doc
                        return self._send(200, doc)
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


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
    with FakeApiServer(webhook_config, namespaces) as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": api.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}],
        }))
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
                with api.lock:
                    bundles = [w["clientConfig"].get("caBundle") for w in api.webhook["webhooks"]]
                return bundles if all(bundles) else None
            bundles = wait_for("the webhook caBundle", ca_bundles)
            for b in bundles:
                assert base64.b64decode(b).decode().strip() == root_pem.strip()
            written = wait_for("the trust bundle ConfigMap", lambda: api.configmaps.get(("demo", config["bundleConfigMap"])))
            assert written["data"]["ca.crt"].strip() == root_pem.strip()
            assert ("other", config["bundleConfigMap"]) not in api.configmaps

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
            sidecar_env = {e["name"]: e["value"] for e in containers["palisade-sidecar"]["env"]}
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
