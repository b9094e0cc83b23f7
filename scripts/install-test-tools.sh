#!/usr/bin/env bash
# Installs what the API and browser tests need beyond cargo, idempotently (fast
# when everything is already there):
#   - schemathesis, in a virtualenv at $SKALD_VENV (default /opt/skald-venv),
#     for tests/tests/openapi.rs;
#   - Debian's chromium (if /usr/bin/chromium is missing) and playwright-core
#     (`npm ci` in tests/browser), for tests/tests/dashboard.rs.
# Playwright's own browser download is not used (it cannot work offline).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${SKALD_VENV:-/opt/skald-venv}
schemathesis_version=${SCHEMATHESIS_VERSION:-4.32.5}

log() { printf '== install-test-tools: %s\n' "$*"; }

if [ -x "$venv/bin/schemathesis" ] && "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  log "schemathesis $schemathesis_version already in $venv"
else
  log "installing schemathesis $schemathesis_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

if [ -x /usr/bin/chromium ]; then
  log "chromium already installed"
else
  log "installing chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if [ -f tests/browser/node_modules/playwright-core/package.json ] \
  && cmp -s tests/browser/package-lock.json tests/browser/node_modules/.skald-installed-lock; then
  log "playwright-core already installed in tests/browser"
else
  log "npm ci in tests/browser"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/browser/package-lock.json tests/browser/node_modules/.skald-installed-lock
fi
log "done"
