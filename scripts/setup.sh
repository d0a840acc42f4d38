#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: bubblewrap, a virtualenv in .venv, and Tardigrade installed into it.
# Usage: scripts/setup.sh [extra]   (extra: a pip extra such as "test")
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

if ! command -v bwrap >/dev/null; then
  echo "==> installing bubblewrap (the local sandbox's isolation)"
  as_root apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq bubblewrap >/dev/null; } \
    || echo "!! could not install bubblewrap; pipelines that say 'isolation: required' will refuse to run" >&2
fi

if ! command -v slirp4netns >/dev/null; then
  echo "==> installing slirp4netns (user-mode networking for sandboxes with network: true)"
  as_root apt-get install -y -qq slirp4netns >/dev/null 2>&1 \
    || { as_root apt-get update -qq >/dev/null && as_root apt-get install -y -qq slirp4netns >/dev/null; } \
    || echo "!! could not install slirp4netns; pipelines with 'network: true' will refuse to run" >&2
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
extra="${1:-}"
spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.installed-${extra:-base}-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "==> installing tardigrade${extra:+[$extra]} into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e "$spec"
  touch "$stamp"
fi
