#!/usr/bin/env python3
"""Every PromQL expression Palisade ships, ready to be parsed.

Sources:

- deploy/prometheus/palisade-rules.yaml: the `expr` of every recording and
  alerting rule, as written;
- deploy/grafana/palisade-dashboard.json: every `targets[].expr` of every
  panel (rows' nested panels included), and the selector inside each
  `label_values(<selector>, <label>)` variable query, with Grafana's
  variables substituted the way the dashboard is rendered against a real
  Prometheus: `$__rate_interval` -> `1m`, `$__interval` -> `30s`,
  `$__range` -> `1h`, and every other `$var` / `${var}` / `[[var]]` -> `.*`
  (the dashboard uses its own variables only inside regex matchers, so the
  result must still be valid PromQL).

As a module: `all_expressions(repo_root) -> list[(source, expr)]`.
As a script (no third-party packages beyond PyYAML):

    python tests/monitoring/expressions.py [REPO_ROOT]

prints one JSON object per line, `{"source": ..., "expr": ...}`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

RULES = Path("deploy/prometheus/palisade-rules.yaml")
DASHBOARD = Path("deploy/grafana/palisade-dashboard.json")

# Grafana's built-in interval variables, and what they become.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}
# $name, ${name}, ${name:format}, [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<args>.*)\)\s*$", re.S)


def substitute(expr: str) -> str:
    """Grafana's variables replaced: built-in intervals by durations, the rest by `.*`."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return BUILTINS.get(name, ".*")

    return _VARIABLE.sub(repl, expr)


def rule_expressions(repo_root: Path) -> list[tuple[str, str]]:
    doc = yaml.safe_load((repo_root / RULES).read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out.append((f"rules:{group['name']}/{name}", rule["expr"].strip()))
    return out


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def variable_selector(query: Any) -> str | None:
    """The series selector of a `label_values(selector, label)` query, if any."""
    if isinstance(query, dict):
        query = query.get("query")
    if not isinstance(query, str):
        return None
    m = _LABEL_VALUES.match(query)
    if not m:
        return None
    args = m.group("args")
    # label_values(label) has no selector; label_values(selector, label) has one.
    if "," not in args:
        return None
    return args.rsplit(",", 1)[0].strip()


def dashboard_expressions(repo_root: Path) -> list[tuple[str, str]]:
    dashboard = json.loads((repo_root / DASHBOARD).read_text())
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            source = f"dashboard:panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}"
            out.append((source, substitute(target["expr"]).strip()))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        selector = variable_selector(var.get("query"))
        if selector is not None:
            out.append((f"dashboard:variable {var['name']}", substitute(selector)))
    return out


def all_expressions(repo_root: str | Path) -> list[tuple[str, str]]:
    """(source, expression) for every rule and dashboard expression."""
    root = Path(repo_root)
    return rule_expressions(root) + dashboard_expressions(root)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2]
    for source, expr in all_expressions(root):
        print(json.dumps({"source": source, "expr": expr}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
