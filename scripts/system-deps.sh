#!/usr/bin/env bash
# Installs from Debian what the gateway needs, by purpose:
#   run   (make run): Redis and the PostgreSQL server binaries (initdb/postgres), nothing else;
#   test  (make test, make bench, CI): those, and the servers the tests drive: nginx, Caddy, Chromium
#         (for the web page's tests, driven by Playwright without downloading a browser), and wrk (the
#         load generator of `make bench`), redis-sentinel (the Sentinel tests' topology) and kubectl (its
#         kustomize renders deploy/kubernetes/; Debian's package is kubernetes-client, too old for it: the
#         machine's own kubectl is used) and docker-compose (checks deploy/compose/ offline, no daemon).
# `--print MODE` only prints the packages MODE needs, installed or not.
set -euo pipefail
print=0
if [ "${1:-}" = "--print" ]; then print=1; shift; fi
mode="${1:-test}"
case "$mode" in run|test) ;; *) echo "usage: $0 [--print] run|test" >&2; exit 2 ;; esac
wanted=(redis-server postgresql)
if [ "$mode" = test ]; then wanted+=(nginx-light caddy chromium wrk redis-sentinel kubernetes-client docker-compose); fi
if [ "$print" = 1 ]; then echo "${wanted[*]}"; exit 0; fi
need=()
for pkg in "${wanted[@]}"; do
  case "$pkg" in
    redis-server) command -v redis-server >/dev/null 2>&1 || need+=("$pkg") ;;
    postgresql) command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=("$pkg") ;;
    nginx-light) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=("$pkg") ;;
    caddy) command -v caddy >/dev/null 2>&1 || need+=("$pkg") ;;
    chromium) [ -x /usr/bin/chromium ] || need+=("$pkg") ;;
    wrk) command -v wrk >/dev/null 2>&1 || need+=("$pkg") ;;
    redis-sentinel) command -v redis-sentinel >/dev/null 2>&1 || need+=("$pkg") ;;
    kubernetes-client) command -v kubectl >/dev/null 2>&1 || need+=("$pkg") ;;
    docker-compose) command -v docker-compose >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; install them (sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
