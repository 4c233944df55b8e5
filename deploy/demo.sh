#!/usr/bin/env bash
# The local demo: a control plane with a fresh CA and static tokens issues
# short-lived certificates to two workloads and renews them as they age.
# No root, no Kubernetes. Ctrl-C stops everything and removes what it made.
#
#   ./deploy/demo.sh                      run until Ctrl-C
#   PALISADE_DEMO_SECONDS=40 ./deploy/demo.sh   stop by itself (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${PALISADE_DEMO_SECONDS:-0}"
LIFETIME="${PALISADE_DEMO_LIFETIME:-60s}"
GRPC_PORT="${PALISADE_DEMO_GRPC_PORT:-15012}"
ADMIN_PORT="${PALISADE_DEMO_ADMIN_PORT:-15014}"
TRUST_DOMAIN=cluster.local

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

say "building palisade-control-plane and palisade-sidecar (first run takes a few minutes)"
cargo build --quiet --locked -p palisade-control-plane -p palisade-sidecar
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"

WORK="$(mktemp -d -t palisade-demo.XXXXXX)"
CP_PID=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$CP_PID" ] && kill -0 "$CP_PID" 2>/dev/null; then
    kill -TERM "$CP_PID" 2>/dev/null || true
    wait "$CP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  say "stopped; removed $WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "creating a fresh root CA for trust domain $TRUST_DOMAIN"
"$BIN/palisade-control-plane" ca init --out "$WORK/ca" --trust-domain "$TRUST_DOMAIN" >/dev/null

token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
WEB_ID="spiffe://$TRUST_DOMAIN/ns/demo/sa/web"
API_ID="spiffe://$TRUST_DOMAIN/ns/demo/sa/api"
token > "$WORK/web.token"
token > "$WORK/api.token"
cat > "$WORK/tokens.yaml" <<YAML
tokens:
  - token: "$(cat "$WORK/web.token")"
    identity: $WEB_ID
  - token: "$(cat "$WORK/api.token")"
    identity: $API_ID
YAML

say "starting the control plane: gRPC on 127.0.0.1:$GRPC_PORT, admin on 127.0.0.1:$ADMIN_PORT"
"$BIN/palisade-control-plane" serve \
  --ca-dir "$WORK/ca" --trust-domain "$TRUST_DOMAIN" \
  --authenticator static --static-tokens "$WORK/tokens.yaml" \
  --grpc-addr "127.0.0.1:$GRPC_PORT" --admin-addr "127.0.0.1:$ADMIN_PORT" \
  --log-level warn &
CP_PID=$!
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$CP_PID" 2>/dev/null; then echo "the control plane exited; is port $GRPC_PORT or $ADMIN_PORT in use?" >&2; exit 1; fi
  sleep 0.1
done

certify() { # name identity
  "$BIN/palisade-sidecar" certify \
    --control-plane "https://127.0.0.1:$GRPC_PORT" --control-plane-name localhost \
    --bundle "$WORK/ca/ca.crt" --identity "$2" --token-file "$WORK/$1.token" \
    --lifetime "$LIFETIME" --out "$WORK/$1" 2>&1
}

show() { # name
  openssl x509 -in "$WORK/$1/tls.crt" -noout -ext subjectAltName -enddate 2>/dev/null \
    | sed -n 's/^ *URI:/    identity  /p; s/^notAfter=/    expires   /p'
  openssl verify -CAfile "$WORK/$1/ca.crt" "$WORK/$1/tls.crt" | sed 's/^/    verify    /'
}

for name in web api; do
  id_var="$(echo "$name" | tr a-z A-Z)_ID"
  say "$name asks for a certificate as ${!id_var} (fresh P-256 key, $LIFETIME lifetime)"
  certify "$name" "${!id_var}" | sed 's/^/    /'
  show "$name"
done

say "web now claims to be api with its own token: the control plane refuses"
if out=$(certify web "$API_ID"); then echo "unexpected: $out"; exit 1; fi
echo "$out" | sed 's/^/    /'

say "metrics at http://127.0.0.1:$ADMIN_PORT/metrics"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E '^palisade_ca_(certificates_issued_total|authentication_failures_total|trust_bundle_roots)' | sed 's/^/    /'

RENEW_EVERY=30
say "renewing each certificate every ${RENEW_EVERY}s with a fresh key (Ctrl-C to stop)"
start=$SECONDS
while :; do
  if [ "$DURATION" -gt 0 ] && [ $((SECONDS - start)) -ge "$DURATION" ]; then break; fi
  sleep 1
  if [ $(((SECONDS - start) % RENEW_EVERY)) -eq 0 ]; then
    for name in web api; do
      id_var="$(echo "$name" | tr a-z A-Z)_ID"
      printf '    %s rotated: ' "$name"; certify "$name" "${!id_var}"
    done
  fi
done
say "demo finished after ${DURATION}s"
