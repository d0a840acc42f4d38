#!/usr/bin/env bash
# The main job: a 40-step pipeline loses its sandbox at step 22 and finishes anyway.
# Starts the embedded Temporal dev server (SQLite, Web UI), a worker, a bubblewrap sandbox and a local
# snapshot store; needs no cloud account and no Docker. Arguments go to `tardigrade demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/tardigrade demo "$@"
