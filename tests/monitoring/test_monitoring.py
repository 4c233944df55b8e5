"""Tests of the monitoring assets: deploy/prometheus and deploy/grafana.

Run from the repository root:

    target/pyenv/bin/python -m pytest tests/monitoring -q

They need `promtool` (Debian package `prometheus`, which tests/run.sh
installs): the rule file must pass `promtool check rules`, its unit tests
`promtool test rules`, every alert must be exercised (firing and quiet) by
those unit tests, and every PromQL expression of the rules and of the
dashboard (after Grafana's variables are substituted, see expressions.py)
must parse. There is no `promtool check query`, so the expressions go into a
throwaway rule file, one recording rule each, for `promtool check rules`,
which parses PromQL strictly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import expressions  # noqa: E402

REPO = HERE.parents[1]
RULES = REPO / "deploy" / "prometheus" / "palisade-rules.yaml"
RULE_TESTS = sorted((REPO / "deploy" / "prometheus" / "tests").glob("*.yaml"))
CHART_RULES = REPO / "helm" / "palisade" / "files" / "palisade-rules.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "palisade-dashboard.json"
DASHBOARD_UID = "palisade-mesh"


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: tests/run.sh installs it (Debian package `prometheus`); "
            "or run `apt-get install prometheus`"
        )
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return list(expressions._panels(d["panels"]))


# === the rule file ===========================================================


def test_promtool_check_rules(promtool: str) -> None:
    r = run([promtool, "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    r = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout


def _alert_cases() -> tuple[set[str], set[str]]:
    """Alert names some unit test expects to fire, and ones it expects quiet."""
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../palisade-rules.yaml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test") or []:
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    return firing, quiet


def test_every_alert_is_tested_firing_and_quiet() -> None:
    names = set(alerts())
    firing, quiet = _alert_cases()
    assert names - firing == set(), "alerts no unit test expects to fire"
    assert names - quiet == set(), "alerts no unit test expects to stay quiet"
    assert (firing | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_expected_alerts_are_exact() -> None:
    """Every expected alert states its labels (severity included) and every annotation."""
    by_name = alerts()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test") or []:
                rule = by_name[case["alertname"]]
                for exp in case.get("exp_alerts") or []:
                    where = f"{path.name}: {test['name']}: {case['alertname']} at {case['eval_time']}"
                    assert exp["exp_labels"]["severity"] == rule["labels"]["severity"], where
                    assert set(exp["exp_annotations"]) == set(rule["annotations"]), where


def test_alerts_are_complete() -> None:
    assert len(alerts()) >= 10
    for name, rule in alerts().items():
        assert name.startswith("Palisade"), name
        assert re.fullmatch(r"[0-9]+[smh]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        ann = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(ann), name
        assert all(ann[k].strip() for k in ("summary", "description", "runbook")), name
        # No accidental Helm-style or unbalanced templates.
        for text in ann.values():
            assert text.count("{{") == text.count("}}"), name
            assert "{{ ." not in text and "tpl" not in text, name


def test_required_alerts_exist() -> None:
    severities = {name: r["labels"]["severity"] for name, r in alerts().items()}
    required = {
        "PalisadeCertificateExpiringSoon": "warning",
        "PalisadeCertificateExpiryCritical": "critical",
        "PalisadeCertificateRenewalsFailing": "warning",
        "PalisadeHandshakeFailureRatioHigh": "warning",
        "PalisadeCAIssuerExpiringSoon": "warning",
        "PalisadeCAIssuerExpiryCritical": "critical",
        "PalisadeControlPlaneAbsent": "critical",
        "PalisadeAuthorizationDenialsSpiking": "warning",
        "PalisadeDeniedIdentityStillConnecting": "warning",
        "PalisadeAuditPolicyWouldDeny": "info",
    }
    for name, severity in required.items():
        assert severities.get(name) == severity, name
    # The authorization records keep the policy that decided, and no label
    # whose values are unbounded (peer identities are in the access log).
    for record in ("palisade:authz_denied:rate5m", "palisade:authz_audit_denied:rate5m"):
        (rule,) = [r for r in rules() if r.get("record") == record]
        assert "by (namespace, port, policy)" in rule["expr"], record
    # The handshake alert keeps direction and reason as labels.
    expr = alerts()["PalisadeHandshakeFailureRatioHigh"]["expr"]
    assert "by (namespace, direction, reason)" in expr


def test_recording_rules_are_namespaced() -> None:
    records = [r["record"] for r in rules() if "record" in r]
    assert records
    assert all(re.fullmatch(r"palisade:[a-z0-9_]+:[a-z0-9_]+", r) for r in records), records


def test_rules_match_no_job_name() -> None:
    """The rules find their targets by metric, never by a job name."""
    for rule in rules():
        assert not re.search(r"\bjob\s*=~?\s*\"", rule["expr"]), rule.get("alert") or rule.get("record")


def _exported_metrics() -> set[str]:
    names = set()
    for src in (REPO / "sidecar" / "src" / "metrics.rs", REPO / "control-plane" / "src" / "metrics.rs"):
        names |= set(re.findall(r'"(palisade_[a-z0-9_]+)"', src.read_text()))
    return names


def test_expressions_use_only_exported_metrics() -> None:
    exported = _exported_metrics()
    assert "palisade_tls_handshakes_total" in exported
    records = {r["record"] for r in rules() if "record" in r}
    for source, expr in expressions.all_expressions(REPO):
        for name in re.findall(r"\bpalisade_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or base in exported, f"{source}: unknown metric {name}"
        for name in re.findall(r"\bpalisade:[a-z0-9_:]+", expr):
            assert name in records, f"{source}: unknown recording rule {name}"


def test_chart_copy_is_identical() -> None:
    assert CHART_RULES.read_bytes() == RULES.read_bytes(), (
        "helm/palisade/files/palisade-rules.yaml differs from deploy/prometheus/palisade-rules.yaml: "
        "cp deploy/prometheus/palisade-rules.yaml helm/palisade/files/"
    )


# === the dashboard ===========================================================

REQUIRED_PANELS = {
    "Handshakes by result and reason": ["palisade_tls_handshakes_total", "result", "reason"],
    "Handshake latency (p50, p90, p99) by direction": ["palisade_tls_handshake_duration_seconds_bucket", "direction"],
    "Time to certificate expiry by identity": ["palisade_cert_expiration_timestamp_seconds", "identity", "time()"],
    "Certificate renewals": ["palisade_cert_renewals_total", "result"],
    "Authorization decisions by policy and port": [
        "palisade_authz_decisions_total",
        "decision",
        "audit_deny",
        "policy",
        "port",
    ],
    "What a deny default would refuse (audit mode)": [
        'palisade_authz_decisions_total{decision="audit_deny"',
        "by (namespace, pod, port, policy)",
        "[$__range]",
    ],
    "CA issuance by result and reason": ["palisade_ca_certificates_issued_total", "result", "reason"],
    "CA issuance latency (p50, p90, p99)": ["palisade_ca_issue_duration_seconds_bucket"],
    "Active connections": ["palisade_connections_active"],
    "Bytes relayed": ["palisade_bytes_total"],
}


def test_dashboard_identity() -> None:
    d = dashboard()
    assert d["uid"] == DASHBOARD_UID
    assert d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels(d)]
    assert len(titles) == len(set(titles)), "duplicate panel titles"


def test_dashboard_required_panels() -> None:
    by_title = {p["title"]: p for p in panels(dashboard())}
    for title, needles in REQUIRED_PANELS.items():
        assert title in by_title, f"missing panel {title!r}"
        exprs = " ".join(t["expr"] for t in by_title[title]["targets"])
        for needle in needles:
            assert needle in exprs, f"{title}: {needle} not queried"


@pytest.mark.parametrize(
    "title", ["Handshake latency (p50, p90, p99) by direction", "CA issuance latency (p50, p90, p99)"]
)
def test_dashboard_latency_quantiles(title: str) -> None:
    (panel,) = [p for p in panels(dashboard()) if p["title"] == title]
    quantiles = []
    for target in panel["targets"]:
        m = re.match(r"histogram_quantile\((0\.\d+), sum by \(([^)]*)\) \(rate\((\w+)\{?[^\[]*\[\$__rate_interval\]\)\)\)$", target["expr"])
        assert m, target["expr"]
        assert "le" in [s.strip() for s in m.group(2).split(",")]
        assert m.group(3).endswith("_bucket")
        quantiles.append(float(m.group(1)))
    assert quantiles == [0.5, 0.9, 0.99]


def test_dashboard_targets_and_datasource() -> None:
    d = dashboard()
    (ds,) = [v for v in d["templating"]["list"] if v["name"] == "datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    want = {"type": "prometheus", "uid": "${datasource}"}
    data_panels = [p for p in panels(d) if p["type"] != "row"]
    assert len(data_panels) >= 15
    for p in data_panels:
        assert p["datasource"] == want, p["title"]
        assert p.get("targets"), f"{p['title']}: no targets"
        for t in p["targets"]:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{p['title']}: target without expr"
            assert t.get("datasource", want) == want, p["title"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == want, v["name"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) >= {"datasource", "namespace", "identity"}
    for name in ("namespace", "identity"):
        v = variables[name]
        assert v["type"] == "query"
        assert re.fullmatch(rf"label_values\(.+, {name}\)", v["query"]["query"]), v["query"]
        assert v["definition"] == v["query"]["query"]
        assert v["includeAll"] and v["allValue"] == ".*"
    used = " ".join(t["expr"] for p in panels(dashboard()) for t in p.get("targets") or [])
    assert '=~"$namespace"' in used and '=~"$identity"' in used


_VAR = re.compile(r"\$\{?(\w+)")


def test_dashboard_variables_only_inside_regex_matchers() -> None:
    """Our own variables appear only as `label=~"...$var..."`; built-ins only as range durations."""
    for p in panels(dashboard()):
        for t in p.get("targets") or []:
            expr = t["expr"]
            for m in _VAR.finditer(expr):
                name = m.group(1)
                before = expr[: m.start()]
                if name in expressions.BUILTINS:
                    assert before.endswith("["), f"{p['title']}: ${name} outside a range"
                else:
                    assert re.search(r'[=!]~"[^"]*$', before), f"{p['title']}: ${name} outside a regex matcher"


# === every expression parses =================================================


def _check_expressions(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    doc = {"groups": [{"name": "check", "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "check-rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run([promtool, "check", "rules", str(path)])


def test_the_expression_check_is_strict(promtool: str, tmp_path: Path) -> None:
    """The throwaway-rule-file check refuses what a broken dashboard would contain."""
    assert _check_expressions(promtool, ["sum(rate(up[1m]))"], tmp_path).returncode == 0
    for bad in [
        "sum(rate(up[1m])",  # unbalanced
        "rate(up[$__rate_interval])",  # an unsubstituted variable
        "rate(up[1m]) > .*",  # a variable used as a bare token
        "histogram_quantile(0.99, rate(up))",  # a range function without a range
    ]:
        r = _check_expressions(promtool, [bad], tmp_path)
        assert r.returncode != 0, f"accepted {bad!r}"


def test_all_expressions_parse(promtool: str, tmp_path: Path) -> None:
    found = expressions.all_expressions(REPO)
    sources = [s for s, _ in found]
    assert len(sources) == len(set(sources)), "duplicate sources"
    assert sum(s.startswith("rules:") for s in sources) == len(rules())
    n_targets = sum(len(p.get("targets") or []) for p in panels(dashboard()))
    assert sum(s.startswith("dashboard:panel") for s in sources) == n_targets
    assert any(s.startswith("dashboard:variable") for s in sources)
    for source, expr in found:
        assert expr and "$" not in expr and "[[" not in expr, f"{source}: {expr}"
    r = _check_expressions(promtool, [e for _, e in found], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(found)} rules found" in r.stdout


def test_substitution() -> None:
    assert expressions.substitute('rate(x{a=~"$namespace",b=~"${identity}"}[$__rate_interval])') == (
        'rate(x{a=~".*",b=~".*"}[1m])'
    )
    assert expressions.substitute("increase(x[$__range]) / $__interval") == "increase(x[1h]) / 30s"
    assert expressions.substitute('x{a=~"[[namespace]]",b=~"${identity:regex}"}') == 'x{a=~".*",b=~".*"}'
    assert expressions.variable_selector({"query": 'label_values(m{a=~"$x"}, identity)'}) == 'm{a=~"$x"}'
    assert expressions.variable_selector("label_values(namespace)") is None


def test_expressions_script_prints_json_lines() -> None:
    r = subprocess.run(
        [sys.executable, str(HERE / "expressions.py"), str(REPO)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["source"], x["expr"]) for x in lines] == expressions.all_expressions(REPO)
    assert all(set(x) == {"source", "expr"} for x in lines)
