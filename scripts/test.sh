#!/usr/bin/env bash
# The test suite against real local services: the Temporal dev server, bubblewrap, moto_server (S3),
# fake-gcs-server (GCS) and azurite (Azure Blob). Installs what it needs; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test

# Debian packages only the tests need; a missing one fails its tests (TARDIGRADE_REQUIRE_EMULATORS=1), loudly.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {  # apt_install PACKAGE WHY
  echo "==> installing $1 ($2)"
  as_root apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1 \
    || { as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq --no-install-recommends "$1" >/dev/null; } \
    || echo "!! could not install $1: the tests that need it will fail or be skipped" >&2
}
# Compose's own validator for docker-compose.temporal.yml (tests/test_deployment.py); no Docker engine is needed.
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
  apt_install docker-compose "validates the compose file"
fi
# Headless Chromium renders the Temporal Web UI (tests/test_web_ui.py, tests/security/test_codec.py).
if ! command -v chromium >/dev/null; then
  apt_install chromium "renders the Web UI in the tests"
fi

if [ ! -x node_modules/.bin/azurite-blob ]; then
  if command -v npm >/dev/null; then
    echo "==> installing azurite (Azure Blob emulator) from npm"
    npm install --no-save --no-audit --no-fund --silent azurite >/dev/null
  else
    echo "!! npm not found: the Azure store tests will fail (TARDIGRADE_REQUIRE_EMULATORS=1)" >&2
  fi
fi

# The TypeScript client's dependencies, from its lockfile; tests/test_typescript_client.py runs its `npm test`.
ts_stamp="clients/typescript/node_modules/.installed-$(cksum < clients/typescript/package-lock.json | cut -d' ' -f1)"
if [ ! -f "$ts_stamp" ] && command -v npm >/dev/null; then
  echo "==> installing the TypeScript client's dependencies (npm ci in clients/typescript)"
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && touch "$ts_stamp"
fi

# The Cloudflare bridge Worker must type-check against @cloudflare/sandbox's types (its own node_modules).
if command -v npm >/dev/null; then
  scripts/check-cloudflare-bridge.sh
fi

# Emulators are started by the tests' own fixtures; a missing one is a failure here, not a skip.
export TARDIGRADE_REQUIRE_EMULATORS=1
set +e
# Two workers, each taking whole test files (their module fixtures stay together): most tests wait on Temporal,
# bubblewrap and the emulators rather than compute, so this halves the wall time on 2 cores. Every fixture picks
# free ports and its own folders. TARDIGRADE_TEST_WORKERS=0 runs in one process (easier to debug).
.venv/bin/pytest -n "${TARDIGRADE_TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit code 5): nothing matched the selection" >&2
  exit 0
fi
exit "$status"
