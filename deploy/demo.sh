#!/usr/bin/env bash
# The local mesh demo, no root and no Kubernetes: a control plane with a fresh
# CA and static tokens; two workloads, "web" and "api", each with a sidecar in
# explicit mode that gets its certificate from the control plane; web calls api
# once a second through both sidecars over mutual TLS. Certificates live 60 s,
# so rotations happen while you watch. Ctrl-C stops everything and removes
# what it made.
#
#   ./deploy/demo.sh                              run until Ctrl-C
#   PALISADE_DEMO_SECONDS=75 ./deploy/demo.sh     stop by itself (CI)
#   PALISADE_DEMO_PORT_BASE=25000 ./deploy/demo.sh   other ports (default 15000)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${PALISADE_DEMO_SECONDS:-0}"
LIFETIME="${PALISADE_DEMO_LIFETIME:-60s}"
BASE="${PALISADE_DEMO_PORT_BASE:-15000}"
GRPC=$((BASE + 12)) CP_ADMIN=$((BASE + 14))
WEB_ADMIN=$((BASE + 20)) API_ADMIN=$((BASE + 21))
WEB_OUT=$((BASE + 2001)) API_IN=$((BASE + 2002)) API_APP=$((BASE + 2080))
TD=cluster.local
WEB_ID="spiffe://$TD/ns/demo/sa/web"
API_ID="spiffe://$TD/ns/demo/sa/api"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

say "building palisade-control-plane and palisade-sidecar (the first build takes a few minutes)"
cargo build --quiet --locked -p palisade-control-plane -p palisade-sidecar
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"

WORK="$(mktemp -d -t palisade-demo.XXXXXX)"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  say "stopped everything; removed $WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() { # url name pid
  for _ in $(seq 1 150); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then echo "$2 exited; see above (is a port in use? try PALISADE_DEMO_PORT_BASE)" >&2; exit 1; fi
    sleep 0.1
  done
  echo "$2 did not become ready" >&2; exit 1
}

say "a fresh root CA for trust domain $TD, and a static token for each workload"
"$BIN/palisade-control-plane" ca init --out "$WORK/ca" --trust-domain "$TD" >/dev/null
token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
token > "$WORK/web.token"; token > "$WORK/api.token"
cat > "$WORK/tokens.yaml" <<YAML
tokens:
  - token: "$(cat "$WORK/web.token")"
    identity: $WEB_ID
  - token: "$(cat "$WORK/api.token")"
    identity: $API_ID
YAML

say "control plane: gRPC https://127.0.0.1:$GRPC, metrics http://127.0.0.1:$CP_ADMIN/metrics"
"$BIN/palisade-control-plane" serve --ca-dir "$WORK/ca" --trust-domain "$TD" \
  --authenticator static --static-tokens "$WORK/tokens.yaml" \
  --grpc-addr "127.0.0.1:$GRPC" --admin-addr "127.0.0.1:$CP_ADMIN" --min-lifetime 10s --log-level warn &
PIDS+=($!)
wait_ready "http://127.0.0.1:$CP_ADMIN/ready" "the control plane" "${PIDS[-1]}"

say "the api app: a plain TCP server on 127.0.0.1:$API_APP"
python3 -u -c '
import socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().decode().strip()
        self.wfile.write(("hello " + line.split()[-1] + ", this is api\n").encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$API_APP" &
PIDS+=($!)

# Sidecar logs: show renewals in plain words, and warnings and errors as they are.
narrate() { # name
  while IFS= read -r line; do
    case "$line" in
      *"renewed the certificate"*)
        serial=$(sed -n 's/.*serial=\([0-9a-f]*\).*/\1/p' <<<"$line" | cut -c1-12)
        until=$(sed -n 's/.*not_after=\([^ ]*\).*/\1/p' <<<"$line")
        next=$(sed -n 's/.*next_renewal_in=\([^ ]*\).*/\1/p' <<<"$line")
        note "[$1 sidecar] new certificate with a fresh key: serial $serial…, valid until $until, next renewal in $next" ;;
      *WARN*|*ERROR*) note "[$1 sidecar] $line" ;;
    esac
  done
}

sidecar() { # name identity admin-port explicit-flag
  "$BIN/palisade-sidecar" run --transparent=false --trust-domain "$TD" \
    --control-plane "https://127.0.0.1:$GRPC" --control-plane-name localhost \
    --bundle "$WORK/ca/ca.crt" --identity "$2" --token-file "$WORK/$1.token" --lifetime "$LIFETIME" \
    --admin-addr "127.0.0.1:$3" "${@:4}" 2> >(narrate "$1") &
  PIDS+=($!)
}

say "api's sidecar: mesh TLS on 127.0.0.1:$API_IN -> the api app; metrics http://127.0.0.1:$API_ADMIN/metrics"
sidecar api "$API_ID" "$API_ADMIN" --explicit-inbound "127.0.0.1:$API_IN=127.0.0.1:$API_APP"
wait_ready "http://127.0.0.1:$API_ADMIN/ready" "api's sidecar" "${PIDS[-1]}"
say "web's sidecar: 127.0.0.1:$WEB_OUT -> mesh TLS to api, which must be $API_ID; metrics http://127.0.0.1:$WEB_ADMIN/metrics"
sidecar web "$WEB_ID" "$WEB_ADMIN" --explicit-outbound "127.0.0.1:$WEB_OUT=127.0.0.1:$API_IN,$API_ID"
wait_ready "http://127.0.0.1:$WEB_ADMIN/ready" "web's sidecar" "${PIDS[-1]}"

verified_peer() { # which identity api's sidecar verified on its latest inbound connections
  curl -fsS "http://127.0.0.1:$API_ADMIN/metrics" \
    | sed -n 's/^palisade_connections_opened_total{direction="inbound",peer_identity="\([^"]*\)",security="mtls"} .*/\1/p' | head -n1
}

say "web calls api once a second: plain TCP from the app, mutual TLS between the sidecars (Ctrl-C to stop)"
start=$SECONDS n=0
while :; do
  if [ "$DURATION" -gt 0 ] && [ $((SECONDS - start)) -ge "$DURATION" ]; then break; fi
  n=$((n + 1))
  reply=$(python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"request from web\n")
print(s.makefile().readline().strip())
' "$WEB_OUT" 2>&1) || reply="FAILED: $reply"
  note "#$n web -> api: \"$reply\" (api's sidecar verified the caller as $(verified_peer))"
  sleep 1
done

say "what the sidecars counted"
for s in "web $WEB_ADMIN" "api $API_ADMIN"; do
  set -- $s
  curl -fsS "http://127.0.0.1:$2/metrics" \
    | grep -E '^palisade_(tls_handshakes_total|cert_renewals_total)' | grep -v ' 0$' | sed "s/^/    [$1] /"
done
say "demo finished after ${DURATION}s"
