#!/usr/bin/env bash
# Type-check the Cloudflare bridge Worker (clients/cloudflare-bridge/) against the pinned @cloudflare/sandbox types:
# install its npm packages from package-lock.json into its own node_modules (once per lockfile), then `tsc --noEmit`.
# tests/test_cloudflare.py::test_the_bridge_type_checks runs the same check whenever node_modules is there.
set -euo pipefail
cd "$(dirname "$0")/../clients/cloudflare-bridge"
if ! command -v npm >/dev/null; then
  echo "check-cloudflare-bridge: npm is not installed (apt-get install -y nodejs npm)" >&2
  exit 1
fi
stamp="node_modules/.installed-$(cksum < package-lock.json | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  touch "$stamp"
fi
npx --no-install tsc --noEmit -p .
echo "cloudflare bridge: tsc --noEmit passed"
