#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs
# every check: formatting, lints, unit tests, whole-system tests, the demo.
#
#   ./tests/run.sh
#
# Tests that need root (network namespaces, iptables) run when this is run as
# root, as CI does; elsewhere they fail loudly rather than pass silently.
if [ "$(id -u)" -ne 0 ]; then
  echo "!!! not root: the namespaced and iptables tests will FAIL (they need root; CI runs as root)" >&2
fi
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }

# --- tools the tests call -------------------------------------------------
# command -> Debian package
declare -A PACKAGES=(
  [openssl]=openssl
  [curl]=curl
  [iptables]=iptables
  [ip]=iproute2
  [tcpdump]=tcpdump
  [setpriv]=util-linux
  [python3]=python3
  [/usr/bin/kill]=procps
  [promtool]=prometheus
)
missing=()
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Packages with a daemon (prometheus) must not start it: the tests start
    # their own, on loopback, and stop them.
    policy_rc_d=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      policy_rc_d=/usr/sbin/policy-rc.d
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$policy_rc_d" ]; then rm -f "$policy_rc_d"; fi
  else
    echo "!!! missing ${missing[*]} and not root: install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
  fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Python tools for the chart and webhook checks, in a venv of their own.
export PALISADE_PYENV="$PWD/target/pyenv"
if ! "$PALISADE_PYENV/bin/python" -c 'import helm_python, kubernetes_validate, jsonpatch, pytest, yaml' 2>/dev/null \
   || ! cmp -s tests/requirements.txt "$PALISADE_PYENV/requirements.txt"; then
  step "installing the Python test tools into target/pyenv"
  python3 -m venv --clear "$PALISADE_PYENV" 2>/dev/null || {
    # Debian splits venv support out of python3.
    [ "$(id -u)" -eq 0 ] && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv --clear "$PALISADE_PYENV"; }
  "$PALISADE_PYENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt "$PALISADE_PYENV/requirements.txt"
fi

# --- checks ---------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "fetching every locked package (tests/tests/dependencies.rs reads the tree for all targets, offline)"
cargo fetch --locked

step "building the binaries the whole-system tests start"
cargo build --workspace --bins --locked

step "Helm chart: render, lint, Kubernetes 1.33 schemas, and the control plane run with what it renders"
"$PALISADE_PYENV/bin/python" -m pytest tests/chart -q -p no:cacheprovider

step "alert rules (promtool test rules) and the Grafana dashboard"
"$PALISADE_PYENV/bin/python" -m pytest tests/monitoring -q -p no:cacheprovider

step "unit and whole-system tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile"

step "the local demo, bounded (20 s certificates so rotations show)"
out="$(PALISADE_DEMO_SECONDS=25 PALISADE_DEMO_LIFETIME=20s PALISADE_DEMO_PORT_BASE=25000 ./deploy/demo.sh 2>&1)" || {
  echo "$out"; echo "!!! the demo failed" >&2; exit 1; }
echo "$out" | tail -n 12
fail=0
grep -qF "api's sidecar verified the caller as spiffe://cluster.local/ns/demo/sa/web" <<<"$out" \
  || { echo "!!! the demo shows no verified peer identity" >&2; fail=1; }
rotations=$(grep -c "new certificate with a fresh key" <<<"$out" || true)
[ "$rotations" -ge 3 ] || { echo "!!! the demo shows $rotations certificates, expected the first two and a rotation" >&2; fail=1; }
! grep -q "FAILED" <<<"$out" || { echo "!!! a request failed during the demo" >&2; fail=1; }
if pgrep -f "palisade-demo\." >/dev/null; then echo "!!! the demo left processes running" >&2; fail=1; fi
[ "$fail" -eq 0 ] || exit 1
echo "demo: 1 passed, 0 failed"
