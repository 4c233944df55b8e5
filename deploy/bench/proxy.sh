#!/usr/bin/env bash
# The proxy benchmark in one command: Palisade's sidecar pair side by side with
# haproxy, nginx (stream module) and stunnel, on this machine, in one run.
#
#   deploy/bench/proxy.sh [palisade-bench-proxy flags]
#   deploy/bench/proxy.sh --rounds 3 --json proxy.json --markdown proxy.md
#   deploy/bench/proxy.sh --quick                 # smoke test, ~3 min
#
# 1. installs the peers if missing (Debian: haproxy, stunnel4, nginx,
#    libnginx-mod-stream; needs root), with a policy-rc.d that keeps the
#    packages from starting their daemons;
# 2. builds the release binaries (skip with PALISADE_BENCH_NO_BUILD=1);
# 3. raises the open-file limit (10,000 idle connections need ~20,000
#    descriptors per proxy; the harness raises it too, as far as it may);
# 4. runs target/release/palisade-bench-proxy with the arguments given.
#
# See deploy/bench/README.md ("Proxies side by side") for how to read it.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
if command -v nginx >/dev/null 2>&1 && nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
    modules=$(nginx -V 2>&1 | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
    [ -e "${modules:-/usr/lib/nginx/modules}/ngx_stream_module.so" ] || missing+=(libnginx-mod-stream)
elif ! command -v nginx >/dev/null 2>&1; then
    missing+=(libnginx-mod-stream)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "proxy.sh: missing ${missing[*]}; run as root to install them with apt-get" >&2
        exit 1
    fi
    echo "proxy.sh: installing ${missing[*]}" >&2
    policy=/usr/sbin/policy-rc.d
    saved=""
    if [ -e "$policy" ]; then
        saved=$(mktemp)
        cp -p "$policy" "$saved"
    fi
    restore_policy() {
        if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
    }
    trap restore_policy EXIT
    # Exit code 101: "action forbidden", so no daemon is started by the install.
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        haproxy stunnel4 nginx libnginx-mod-stream
    restore_policy
    trap - EXIT
fi

target=${CARGO_TARGET_DIR:-$root/target}
if [ "${PALISADE_BENCH_NO_BUILD:-0}" != 1 ]; then
    cargo build --release -p palisade-sidecar -p palisade-control-plane -p palisade-bench
fi

# As many open files as allowed: raise the hard limit if we may (root with
# CAP_SYS_RESOURCE), else take the hard limit as it is.
want=262144
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want" ]; then
    ulimit -Hn "$want" 2>/dev/null || true
fi
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then
    ulimit -n "$want"
else
    ulimit -n "$hard"
    echo "proxy.sh: open-file limit $hard (could not raise it to $want); idle-connection steps above $(((hard - 256) / 2)) are capped" >&2
fi

exec "$target/release/palisade-bench-proxy" "$@"
