# Shared by scripts/sandbox and scripts/demo (source it; do not run it).
# Installs what the sandbox needs when it is missing and builds the binaries.

set -euo pipefail

FLOTILLA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/flotilla/target}"
export FLOTILLA_VENV="${FLOTILLA_VENV:-${HOME}/.cache/flotilla/venv}"
export FLOTILLA_SANDBOX_DIR="${FLOTILLA_SANDBOX_DIR:-/tmp/flotilla-sandbox}"
SANDBOX_BIN="${CARGO_TARGET_DIR}/debug/flotilla-sandbox"
export FLOTILLA_BIN="${FLOTILLA_BIN:-${CARGO_TARGET_DIR}/debug/flotilla}"

log() { printf '\033[1;34m[sandbox]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[sandbox]\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root for: $*"
  fi
}

# Debian packages: dockerd (docker.io), docker-registry, busybox-static; curl, python3-venv.
install_system_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  # The test images are built from a static busybox.
  if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    missing+=(busybox-static)
  fi
  command -v curl >/dev/null || missing+=(curl)
  command -v iptables >/dev/null || missing+=(iptables)
  # htpasswd -B: bcrypt logins of the private registry in the e2e tests (tests/src/auth_registry.rs).
  command -v htpasswd >/dev/null || missing+=(apache2-utils)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# moto's standalone server in its own venv.
install_moto() {
  if [ -x "${FLOTILLA_VENV}/bin/moto_server" ]; then
    return
  fi
  log "installing moto[server] into ${FLOTILLA_VENV}"
  python3 -m venv "${FLOTILLA_VENV}"
  "${FLOTILLA_VENV}/bin/pip" install -q --upgrade pip
  "${FLOTILLA_VENV}/bin/pip" install -q 'moto[server]'
}

build_binaries() {
  command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
  log "building flotilla and flotilla-sandbox (CARGO_TARGET_DIR=${CARGO_TARGET_DIR})"
  (cd "${FLOTILLA_ROOT}" && cargo build -q -p flotilla -p flotilla-sandbox)
}

# What only the test suite needs beyond the sandbox: Debian's cloud-init (the provisioner's
# tests validate generated user data with `cloud-init schema`; nothing is started).
install_test_extras() {
  if ! command -v cloud-init >/dev/null; then
    log "installing cloud-init (for cloud-init schema)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends cloud-init >/dev/null
  fi
  install_prometheus
}

# Debian's prometheus: promtool checks and unit-tests observability/flotilla.rules.yml, and
# the e2e test `prometheus` runs a real server (its own, on a free loopback port) scraping
# the sandbox daemon. The packaged service is never started: a policy-rc.d refusing every
# start is put in place for the install (when there is none), and nothing may be left
# listening on :9090.
install_prometheus() {
  if command -v promtool >/dev/null && [ -x /usr/bin/prometheus ]; then
    return
  fi
  log "installing prometheus (promtool, and a server for the e2e test; the service is not started)"
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "${policy}" ]; then
    printf '#!/bin/sh\n# flotilla scripts/lib.sh: no service starts during this install\nexit 101\n' \
      | as_root tee "${policy}" >/dev/null
    as_root chmod 0755 "${policy}"
    ours=1
  fi
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { [ "${ours}" -eq 0 ] || as_root rm -f "${policy}"; die "installing prometheus failed"; }
  [ "${ours}" -eq 0 ] || as_root rm -f "${policy}"
  # Belt and braces: a packaged server that started anyway (no policy-rc.d honoured).
  # (the package's init script keeps its pid in /run/prometheus/prometheus.pid).
  if [ -s /run/prometheus/prometheus.pid ]; then
    as_root kill "$(cat /run/prometheus/prometheus.pid)" 2>/dev/null || true
  fi
}

prepare_sandbox() {
  [ "$(id -u)" -eq 0 ] || die "the sandbox runs dockerd and needs root"
  install_system_packages
  install_moto
  build_binaries
}
