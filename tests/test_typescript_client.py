"""The TypeScript client (clients/typescript): its `npm test`, as part of this suite and of CI.

The npm tests start their own Temporal dev server and Python worker from this checkout's install (see
clients/typescript/test/harness.ts), so `npm test` alone works as well; here they run with this interpreter's
`tardigrade`, and their report is printed even when they pass, so CI logs show the TypeScript results (and the
workspace digest comparison). scripts/test.sh installs the package's dependencies (`npm ci`) first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "clients" / "typescript"


def test_npm_test_passes_against_a_dev_server_and_a_python_worker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    npm = shutil.which("npm")
    missing = "npm is not installed" if npm is None else None
    if npm is not None and not (PACKAGE / "node_modules").is_dir():
        missing = "the package's dependencies are not installed (run `npm ci` in clients/typescript)"
    if missing:
        if os.environ.get("TARDIGRADE_REQUIRE_EMULATORS") == "1":
            pytest.fail(f"{missing}; scripts/test.sh installs them")
        pytest.skip(missing)
    assert npm is not None
    # TMPDIR: the harness's stores are temporary folders, which the suite's worker policy allows under pytest's.
    cli = os.path.join(os.path.dirname(sys.executable), "tardigrade")
    env = {**os.environ, "TARDIGRADE_CLI": cli, "TMPDIR": str(tmp_path)}
    done = subprocess.run([npm, "test"], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=900)
    with capsys.disabled():
        print(f"\n--- npm test (clients/typescript), exit code {done.returncode} ---\n{done.stdout.strip()}")
        if done.returncode != 0:
            print(done.stderr.strip()[-4000:])
    assert done.returncode == 0, "npm test failed; its report is printed above"
