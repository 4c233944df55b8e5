"""The stand-in Kubernetes API server, as a process, for the chart tests.

It is the Rust `palisade_tests::kube` server that every Kubernetes-path test
uses, run as `target/debug/palisade-kube-stand-in` (built by tests/run.sh
with `cargo build --workspace --bins`). It serves HTTPS with a CA of its own
and writes a kubeconfig for it; this helper seeds it from a dict, reads its
objects back over the API and its request record from `/stand-in/requests`,
and stops it by closing its standard input.

    with StandIn(tmp_path, objects=[...]) as api:
        run_something(kubeconfig=api.kubeconfig)
        api.get("/api/v1/namespaces/demo/configmaps/x")   # None when 404
        api.requests()                                   # what was asked
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "target" / "debug" / "palisade-kube-stand-in"


class StandIn:
    """A running `palisade-kube-stand-in`; a context manager."""

    def __init__(self, workdir: Path, objects: list[dict[str, Any]] | None = None,
                 token_reviews: dict[str, Any] | None = None, namespace: str | None = None):
        assert BINARY.exists(), (
            f"{BINARY} is missing: tests/run.sh builds it (cargo build --workspace --bins) before the chart tests")
        workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = workdir / "stand-in.kubeconfig"
        self.ca_file = workdir / "stand-in-ca.crt"
        seed = workdir / "stand-in-seed.json"
        seed.write_text(json.dumps({"objects": objects or [], "tokenReviews": token_reviews or {}}))
        self.args = [str(BINARY), "--seed", str(seed), "--kubeconfig", str(self.kubeconfig),
                     "--ca-file", str(self.ca_file)]
        if namespace:
            self.args += ["--namespace", namespace]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.token = ""

    def __enter__(self) -> "StandIn":
        # stdin is the stand-in's lifeline: it stops when the pipe closes.
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"palisade-kube-stand-in exited ({self.proc.wait()}) before it was ready")
        ready = json.loads(line)
        self.url, self.token = ready["url"], ready["token"]
        self.context = ssl.create_default_context(cafile=str(self.ca_file))
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """`method path` with the stand-in's token; the status and the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str) -> Any:
        """The object at `path`, or None when the stand-in answers 404."""
        code, body = self.call("GET", path)
        if code == 404:
            return None
        assert code == 200, (path, code, body)
        return body

    def requests(self) -> list[dict[str, Any]]:
        """Every request recorded: method, path, query, contentType, body, status, ..."""
        code, body = self.call("GET", "/stand-in/requests")
        assert code == 200, body
        return body
