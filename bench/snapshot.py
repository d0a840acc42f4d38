"""Snapshot benchmark: our engine against `tar`, measured side by side in one run on the same files.

    python bench/snapshot.py [--small-files 2000] [--big-mib 200] [--repeat 3] [--store URL]

Workspace: N x 10 KiB random files plus one large random file (random data is the worst case for compression).
Each of our operations runs in a fresh Python process (so its peak RSS is its own); the time printed is the
operation alone, measured inside that process, median of --repeat runs. Interpreter start-up is excluded: a
worker is a long-lived process. Page cache is warm for everyone (every contender reads the files first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- one operation, in a child process ------------------------------------------------------------------------


def child(op: str, store_url: str, root: str, cache: str, arg: str) -> None:
    from sandboxes.snapshots import SnapshotEngine
    from sandboxes.stores import open_store

    engine = SnapshotEngine(open_store(store_url), scratch_dir=Path(cache) / "scratch")
    started = time.perf_counter()
    extra: dict[str, object] = {}
    if op == "create":
        info = engine.create(root, cache_path=Path(cache) / "statcache")
        assert info.stats is not None
        extra = {"id": info.id, "files_read": info.stats.files_read, "bytes_new": info.stats.bytes_new,
                 "bytes_stored": info.stats.bytes_stored}  # fmt: skip
    elif op == "restore":
        stats = engine.restore(arg, root, cache_path=Path(cache) / "statcache")
        extra = {"files_written": stats.files_written, "bytes_written": stats.bytes_written}
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, **extra}))


def run_child(op: str, store_url: str, root: Path, cache: Path, arg: str = "") -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", op, store_url, str(root), str(cache), arg],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


# -- the contenders -------------------------------------------------------------------------------------------


def timed_shell(command: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, shell=True, check=True, cwd=cwd)
    return time.perf_counter() - started


def make_workspace(root: Path, small_files: int, big_mib: int) -> None:
    (root / "small").mkdir(parents=True)
    for i in range(small_files):
        (root / "small" / f"f{i:05}.bin").write_bytes(os.urandom(10 << 10))
    with open(root / "big.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where to build the workspace (default: a temporary folder)")
    args = parser.parse_args()

    base = Path(args.workdir or tempfile.mkdtemp(prefix="tardigrade-bench-"))
    ws = base / "ws"
    if ws.exists():
        shutil.rmtree(ws)
    make_workspace(ws, args.small_files, args.big_mib)
    total_mib = (args.small_files * 10 / 1024) + args.big_mib
    print(f"workspace: {args.small_files} x 10 KiB + 1 x {args.big_mib} MiB random = {total_mib:.0f} MiB ({base})")
    subprocess.run("cat small/* big.bin > /dev/null", shell=True, cwd=ws, check=True)  # warm the page cache

    rows: list[tuple[str, float, str]] = []
    tar_plain = median([timed_shell("tar -cf - . | cat > /dev/null", ws) for _ in range(args.repeat)])
    rows.append(("tar -cf - . | cat >/dev/null", tar_plain, ""))
    tar_zstd_out = base / "ws.tar.zst"
    tar_zstd = median([timed_shell(f"tar --zstd -cf {tar_zstd_out} .", ws) for _ in range(args.repeat)])
    rows.append(("tar --zstd -cf ws.tar.zst .", tar_zstd, f"{tar_zstd_out.stat().st_size / 2**20:.0f} MiB"))

    firsts, first = [], {}
    for i in range(args.repeat):
        store, cache = base / f"store{i}", base / f"cache{i}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        first = run_child("create", store.as_uri(), ws, cache)
        firsts.append(first["seconds"])
    store_url, cache = (base / f"store{args.repeat - 1}").as_uri(), base / f"cache{args.repeat - 1}"
    store_mib = sum(p.stat().st_size for p in Path(store_url[7:]).rglob("*") if p.is_file()) / 2**20
    rows.append(("first snapshot", median(firsts), f"{store_mib:.0f} MiB stored, peak RSS {first['peak_rss_mib']:.0f} MiB"))

    nochange = [run_child("create", store_url, ws, cache) for _ in range(max(args.repeat, 5))]
    rows.append(("snapshot, nothing changed", median([r["seconds"] for r in nochange]),
                 f"{int(nochange[-1]['files_read'])} files read, peak RSS {nochange[-1]['peak_rss_mib']:.0f} MiB"))

    onefile = []
    for i in range(max(args.repeat, 5)):
        (ws / "small" / "f00007.bin").write_bytes(os.urandom(10 << 10))
        onefile.append(run_child("create", store_url, ws, cache))
    last = onefile[-1]
    rows.append(("snapshot, one small file changed", median([r["seconds"] for r in onefile]),
                 f"{int(last['files_read'])} file read, {int(last['bytes_stored']) / 1024:.0f} KiB stored"))
    snapshot_id = str(last["id"])

    restores = []
    for i in range(args.repeat):
        target = base / f"restore{i}"
        shutil.rmtree(target, ignore_errors=True)
        restores.append(run_child("restore", store_url, target, base / f"rcache{i}", snapshot_id))
    rows.append(("full restore into an empty folder", median([r["seconds"] for r in restores]),
                 f"peak RSS {restores[-1]['peak_rss_mib']:.0f} MiB"))
    tar_x = median([timed_shell(f"rm -rf x && mkdir x && tar --zstd -xf {tar_zstd_out} -C x", base)
                    for _ in range(args.repeat)])  # fmt: skip
    rows.append(("tar --zstd -xf (for comparison)", tar_x, ""))

    rollbacks = []
    for i in range(max(args.repeat, 5)):
        (ws / "small" / "f00007.bin").write_bytes(os.urandom(10 << 10))  # a step's half-done edit
        rollbacks.append(run_child("restore", store_url, ws, cache, snapshot_id))
    rows.append(("rollback of one changed file", median([r["seconds"] for r in rollbacks]),
                 f"{int(rollbacks[-1]['files_written'])} file written"))

    print(f"\n{'operation':<36} {'seconds':>9} {'vs tar -cf':>11} {'vs tar --zstd':>14}  notes")
    for name, seconds, note in rows:
        print(f"{name:<36} {seconds:>9.3f} {seconds / tar_plain:>10.2f}x {seconds / tar_zstd:>13.2f}x  {note}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    no_change, one = median([r["seconds"] for r in nochange]), median([r["seconds"] for r in onefile])
    print("\ntargets:")
    print(f"  no-change snapshot <= 10% of tar -cf:  {no_change / tar_plain:.1%}  {verdict(no_change <= 0.1 * tar_plain)}")
    print(f"  one-file snapshot  <= 10% of tar -cf:  {one / tar_plain:.1%}  {verdict(one <= 0.1 * tar_plain)}")
    print(f"  first snapshot <= tar --zstd:          {median(firsts) / tar_zstd:.2f}x  {verdict(median(firsts) <= tar_zstd)}")
    peak = max(first["peak_rss_mib"], restores[-1]["peak_rss_mib"])
    print(f"  peak RSS well under {total_mib:.0f} MiB:          {peak:.0f} MiB  {verdict(peak < total_mib / 2)}")
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
