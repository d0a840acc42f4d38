"""The chaos suite, small: every fault kind once, in turn, into two concurrent runs (bench/chaos.py does 100+).

Real parts only: bench/chaos.py starts its own Temporal dev server, two `python worker.py` processes, a moto S3
server and a folder store on a tmpfs, and injects each fault for real - a sandbox destroyed, a worker SIGKILLed and
one SIGTERMed, the server SIGKILLed and restarted on its database, S3 frozen, the store's disk full. Every run must
complete with the crash-free digest, its audit step must find each step's effect once, and every recorded snapshot
must verify.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import chaos


@pytest.mark.timeout(300)
async def test_every_fault_kind_once_and_every_run_completes_with_the_crash_free_files(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install -y bubblewrap)")
    # bench/chaos.py points this process's AWS variables at its own moto, stopped when it ends: put them back after,
    # or the tests this xdist worker runs next would inherit a dead endpoint and its keys.
    for key in (*chaos.AWS_ENV, "AWS_ENDPOINT_URL"):
        original = os.environ.get(key)
        monkeypatch.setenv(key, original or "")  # recorded: monkeypatch restores (or removes) it at teardown
        if original is None:
            monkeypatch.delenv(key)
    kinds = list(chaos.KINDS)
    if os.geteuid() != 0:
        kinds.remove("disk-full")  # mounting the store's tmpfs needs root
    argv = ["--faults", str(len(kinds)), "--concurrency", "2", "--steps", "8", "--cycle", "--gap", "0.3"]
    args = chaos.parse_args([*argv, "--kinds", ",".join(kinds), "--outage-seconds", "1.5", "--seed", "11"])
    code = await chaos.drive(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{len(kinds)} faults injected" in out
    for kind in kinds:
        assert re.search(rf"^{kind}\s+1\s", out, re.M), f"{kind} was injected once:\n{out}"
    assert "no live sandbox" not in out, "the sandbox fault found a sandbox to destroy"
    completed = re.search(r"(\d+)/(\d+) runs completed", out)
    assert completed and completed.group(1) == completed.group(2) and int(completed.group(2)) >= 2
