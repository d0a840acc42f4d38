"""Snapshot benchmark: our engine against `tar`, measured side by side in one run on the same files.

    python bench/snapshot.py [--small-files 2000] [--big-mib 200] [--repeat 3] [--stores file,s3]
    python bench/snapshot.py --only cli      # tar -cf and the end-to-end CLI rows alone

Workspace: N x 10 KiB random files plus one large random file (random data is the worst case for compression),
and separately 10,000 small text files. Every operation of ours runs in a fresh Python process, so its peak RSS
is its own; the time printed is the operation alone, measured inside that process (median of --repeat runs);
interpreter start-up is excluded because a worker is a long-lived process. Page cache is warm for everyone.

For s3:// a moto_server is started on loopback (real HTTP, real boto3); the comparison there is `tar --zstd`
plus one upload of the archive with boto3, the obvious alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

Row = tuple[str, float, str]


# -- one operation, in a child process ------------------------------------------------------------------------


def child(op: str, store_url: str, root: str, cache: str, arg: str) -> None:
    from tardigrade.sandboxes.snapshots import SnapshotEngine
    from tardigrade.sandboxes.stores import open_store

    engine = SnapshotEngine(open_store(store_url), scratch_dir=Path(cache) / "scratch", encryption=None)
    started = time.perf_counter()
    extra: dict[str, object] = {}
    if op == "create":
        info = engine.create(root, cache_path=Path(cache) / "statcache")
        assert info.stats is not None
        extra = {
            "id": info.id,
            "files_read": info.stats.files_read,
            "bytes_new": info.stats.bytes_new,
            "bytes_stored": info.stats.bytes_stored,
            "packs": info.stats.packs,
        }
    elif op == "restore":
        stats = engine.restore(arg, root, cache_path=Path(cache) / "statcache")
        extra = {"files_written": stats.files_written, "bytes_written": stats.bytes_written}
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, **extra}))


def ours(op: str, store_url: str, root: Path, cache: Path, arg: str = "") -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", op, store_url, str(root), str(cache), arg],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# -- helpers --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def shell(command: str, cwd: Path) -> None:
    subprocess.run(command, shell=True, check=True, cwd=cwd)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def make_workspace(root: Path, small_files: int, big_mib: int) -> None:
    (root / "small").mkdir(parents=True)
    for i in range(small_files):
        (root / "small" / f"f{i:05}.bin").write_bytes(os.urandom(10 << 10))
    with open(root / "big.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))


def make_many_small(root: Path, count: int = 10_000) -> None:
    for d in range(count // 100):
        folder = root / f"pkg{d:03}"
        folder.mkdir(parents=True)
        for f in range(100):
            (folder / f"mod{f:03}.py").write_text(f"# module {d}.{f}\n" + "def f(x):\n    return x * 2\n" * 40)


@contextmanager
def moto(base: Path) -> Iterator[str]:
    """A real moto_server on loopback; yields the bucket URL prefix."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(base / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        yield "s3://bench"
    finally:
        proc.kill()
        proc.wait()


def store_bytes(store_url: str) -> int:
    from tardigrade.sandboxes.stores import open_store

    return sum(o.size for o in open_store(store_url).list(""))


# -- scenarios ------------------------------------------------------------------------------------------------


def bench_local_ops(base: Path, ws: Path, args: argparse.Namespace, rows: list[Row]) -> dict[str, float]:
    """The issue-2 targets: our snapshots against tar -cf and tar --zstd on the same workspace."""
    tar_plain = median([timed(lambda: shell("tar -cf - . | cat > /dev/null", ws)) for _ in range(args.repeat)])
    rows.append(("tar -cf - . | cat >/dev/null", tar_plain, ""))
    archive = base / "ws.tar.zst"
    tar_zstd = median([timed(lambda: shell(f"tar --zstd -cf {archive} .", ws)) for _ in range(args.repeat)])
    rows.append(("tar --zstd -cf ws.tar.zst .", tar_zstd, mib(archive.stat().st_size)))
    # Our stores fsync before a snapshot counts; this is tar held to the same durability.
    durable = f"tar --zstd -cf {archive} . && python3 -c \"import os; os.fsync(os.open('{archive}', os.O_RDONLY))\""
    tar_zstd_sync = median([timed(lambda: shell(durable, ws)) for _ in range(args.repeat)])
    rows.append(("tar --zstd, then fsync (as durable as ours)", tar_zstd_sync, ""))

    firsts, first = [], {}
    for i in range(args.repeat):
        store, cache = base / f"store{i}", base / f"cache{i}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        first = ours("create", store.as_uri(), ws, cache)
        firsts.append(first["seconds"])
    store_url, cache = (base / f"store{args.repeat - 1}").as_uri(), base / f"cache{args.repeat - 1}"
    rows.append(
        (
            "first snapshot",
            median(firsts),
            f"{mib(store_bytes(store_url))} stored, peak RSS {first['peak_rss_mib']:.0f} MiB",
        )
    )

    nochange = [ours("create", store_url, ws, cache) for _ in range(max(args.repeat, 5))]
    no_change = median([r["seconds"] for r in nochange])
    rows.append(("snapshot, nothing changed", no_change, f"{nochange[-1]['files_read']} files read"))

    onefile = []
    for _ in range(max(args.repeat, 5)):
        (ws / "small" / "f00007.bin").write_bytes(os.urandom(10 << 10))
        onefile.append(ours("create", store_url, ws, cache))
    one = median([r["seconds"] for r in onefile])
    rows.append(
        (
            "snapshot, one small file changed",
            one,
            f"{onefile[-1]['files_read']} file read, {mib(onefile[-1]['bytes_stored'])} stored",
        )
    )
    snapshot_id = str(onefile[-1]["id"])

    restores = []
    for i in range(args.repeat):
        target = base / f"restore{i}"
        shutil.rmtree(target, ignore_errors=True)
        restores.append(ours("restore", store_url, target, base / f"rcache{i}", snapshot_id))
    rows.append(
        (
            "full restore into an empty folder",
            median([r["seconds"] for r in restores]),
            f"peak RSS {restores[-1]['peak_rss_mib']:.0f} MiB",
        )
    )
    tar_x = median(
        [
            timed(lambda: shell(f"rm -rf x && mkdir x && tar --zstd -xf {archive} -C x", base))
            for _ in range(args.repeat)
        ]
    )
    rows.append(("tar --zstd -xf (for comparison)", tar_x, ""))

    rollbacks = []
    for _ in range(max(args.repeat, 5)):
        (ws / "small" / "f00007.bin").write_bytes(os.urandom(10 << 10))  # a step's half-done edit
        rollbacks.append(ours("restore", store_url, ws, cache, snapshot_id))
    rollback = median([r["seconds"] for r in rollbacks])
    rows.append(("rollback of one changed file", rollback, f"{rollbacks[-1]['files_written']} file written"))
    return {
        "rollback": rollback,
        "tar": tar_plain,
        "tar_zstd": tar_zstd,
        "tar_zstd_sync": tar_zstd_sync,
        "first": median(firsts),
        "no_change": no_change,
        "one": one,
        "peak": max(first["peak_rss_mib"], restores[-1]["peak_rss_mib"]),
    }


def cli(home: Path, *args: str) -> tuple[float, dict[str, Any]]:
    """One `tardigrade` call as a user makes it (a fresh process); returns its wall time and its JSON output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "TARDIGRADE_"))}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tardigrade.cli", *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "TARDIGRADE_HOME": str(home), "PYTHONPATH": str(REPO)},
    )
    seconds = time.perf_counter() - started
    result: dict[str, Any] = json.loads(out.stdout)
    return seconds, result


def bench_cli(base: Path, ws: Path, args: argparse.Namespace, rows: list[Row]) -> float:
    """`tardigrade snapshot create --parent` after one small file changed, minus the same command's start-up on
    an empty folder (interpreter, imports, opening the store): what a checkpoint costs per invocation."""
    home, empty = base / "cli-home", base / "empty"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    store = (base / "cli-store").as_uri()
    shutil.rmtree(base / "cli-store", ignore_errors=True)
    last = {
        folder: cli(home, "snapshot", "create", str(folder), "--store", store)[1]["snapshot_id"]
        for folder in (ws, empty)
    }
    startup, changed, inside, read = [], [], [], 0
    for _ in range(max(args.repeat, 5)):  # interleaved, so a load spike hits both alike
        seconds, out = cli(home, "snapshot", "create", str(empty), "--store", store, "--parent", last[empty])
        startup.append(seconds)
        last[empty] = out["snapshot_id"]
        (ws / "small" / "f00011.bin").write_bytes(os.urandom(10 << 10))
        seconds, out = cli(home, "snapshot", "create", str(ws), "--store", store, "--parent", last[ws])
        changed.append(seconds)
        inside.append(float(out.get("seconds", 0)))
        last[ws], read = out["snapshot_id"], out.get("files_read", -1)
    rows.append(("CLI create, empty folder (start-up)", median(startup), "a fresh process per call"))
    rows.append(
        (
            "CLI create --parent, one small file changed",
            median(changed),
            f"{read} file(s) read; {median(inside):.3f} s inside create",
        )
    )
    end_to_end = median(changed) - median(startup)
    rows.append(("  end to end, minus the empty folder's", end_to_end, ""))
    return end_to_end


def bench_store(kind: str, store_url: str, base: Path, ws: Path, many: Path, args: argparse.Namespace) -> list[Row]:
    """Issue-3 scenarios on one store: bytes stored and time, against tar --zstd plus one upload."""
    rows: list[Row] = []
    cache = base / f"{kind}-cache"
    archive = base / f"{kind}.tar.zst"

    def upload_archive() -> None:
        if kind == "file":
            shutil.copyfile(archive, base / f"{kind}-uploaded.tar.zst")
        else:
            import boto3

            boto3.client("s3").upload_file(str(archive), "bench", f"tar/{time.time_ns()}.tar.zst")

    def tar_and_upload() -> None:
        shell(f"tar --zstd -cf {archive} .", ws)
        upload_archive()

    tar_up = median([timed(tar_and_upload) for _ in range(args.repeat)])
    rows.append((f"[{kind}] tar --zstd + one upload", tar_up, f"{mib(archive.stat().st_size)} per snapshot"))

    before = store_bytes(store_url)
    first = ours("create", store_url, ws, cache)
    rows.append(
        (
            f"[{kind}] first snapshot",
            first["seconds"],
            f"{mib(store_bytes(store_url) - before)} stored, peak RSS {first['peak_rss_mib']:.0f} MiB",
        )
    )
    (ws / "small" / "f00001.bin").write_bytes(os.urandom(10 << 10))
    before = store_bytes(store_url)
    one = ours("create", store_url, ws, cache)
    rows.append((f"[{kind}] one small file changed", one["seconds"], f"{mib(store_bytes(store_url) - before)} stored"))
    with open(ws / "big.bin", "r+b") as f:  # flip one byte (a different one for each store)
        offset = (args.big_mib << 20) // (3 if kind == "file" else 5)
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    before = store_bytes(store_url)
    byte = ours("create", store_url, ws, cache)
    grown = store_bytes(store_url) - before
    rows.append(
        (
            f"[{kind}] 1-byte change in the {args.big_mib} MiB file",
            byte["seconds"],
            f"{mib(grown)} stored = {grown / (args.big_mib << 20):.2%} of the file",
        )
    )
    before = store_bytes(store_url)
    small = ours("create", store_url, many, base / f"{kind}-many-cache")
    from tardigrade.sandboxes.stores import open_store

    objects = len([o for o in open_store(store_url).list("") if not o.key.startswith("snapshots/")])
    rows.append(
        (
            f"[{kind}] 10,000 small files, first snapshot",
            small["seconds"],
            f"{mib(store_bytes(store_url) - before)} stored; {objects} objects in the store so far",
        )
    )
    restore = ours("restore", store_url, base / f"{kind}-restore", base / f"{kind}-rcache", str(byte["id"]))
    rows.append((f"[{kind}] full restore", restore["seconds"], f"peak RSS {restore['peak_rss_mib']:.0f} MiB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stores", default="", help="also run the object-store scenarios: file,s3")
    parser.add_argument("--only", choices=["cli"], help="measure tar -cf and the CLI rows alone")
    parser.add_argument("--workdir", help="where to build the workspaces (default: a temporary folder)")
    args = parser.parse_args()

    base = Path(args.workdir or tempfile.mkdtemp(prefix="tardigrade-bench-"))
    ws = base / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    make_workspace(ws, args.small_files, args.big_mib)
    total_mib = (args.small_files * 10 / 1024) + args.big_mib
    print(f"workspace: {args.small_files} x 10 KiB + 1 x {args.big_mib} MiB random = {total_mib:.0f} MiB ({base})")
    shell("cat small/* big.bin > /dev/null", ws)  # warm the page cache

    rows: list[Row] = []
    if args.only == "cli":
        tar_alone = median([timed(lambda: shell("tar -cf - . | cat > /dev/null", ws)) for _ in range(args.repeat)])
        rows.append(("tar -cf - . | cat >/dev/null", tar_alone, ""))
        targets = {"tar": tar_alone, "tar_zstd": float("nan")}
    else:
        targets = bench_local_ops(base, ws, args, rows)
    targets["cli_one"] = bench_cli(base, ws, args, rows)
    if args.stores:
        many = base / "many"
        shutil.rmtree(many, ignore_errors=True)
        make_many_small(many)
        for kind in args.stores.split(","):
            if kind == "file":
                rows += bench_store("file", (base / "bench-store").as_uri(), base, ws, many, args)
            elif kind == "s3":
                with moto(base) as bucket:
                    rows += bench_store("s3", f"{bucket}/snapshots", base, ws, many, args)
            else:
                raise SystemExit(f"unknown store kind {kind!r}: use file and/or s3")

    tar_plain, tar_zstd = targets["tar"], targets["tar_zstd"]
    print(f"\n{'operation':<46} {'seconds':>9} {'vs tar -cf':>11} {'vs tar --zstd':>14}  notes")
    for name, seconds, note in rows:
        print(f"{name:<46} {seconds:>9.3f} {seconds / tar_plain:>10.2f}x {seconds / tar_zstd:>13.2f}x  {note}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print("\ntargets (x tar -cf measured above):")
    for name, key, goal in (
        ("no-change snapshot (issue 2)", "no_change", 0.10),
        ("one small file changed, in-process (issue 12)", "one", 0.05),
        ("one small file changed, end to end CLI (issue 12)", "cli_one", 0.10),
        ("rollback of one changed file (issue 12)", "rollback", 0.05),
    ):
        if key not in targets:
            continue
        ratio = targets[key] / tar_plain
        print(f"  {name:<52} {ratio:6.3f}x  goal <= {goal:.2f}x  {verdict(ratio <= goal)}")
    if "first" in targets:
        ratio = targets["first"] / tar_zstd
        print(
            f"  {'first snapshot, x tar --zstd (issue 12)':<52} {ratio:6.3f}x  goal <= 0.80x  {verdict(ratio <= 0.8)}"
        )
        sync = targets["tar_zstd_sync"]
        ratio, met = targets["first"] / sync, verdict(targets["first"] <= sync)
        print(f"    (vs tar --zstd + fsync, as durable:  {ratio:6.2f}x  {met})")
        print(
            f"  peak RSS well under {total_mib:.0f} MiB:          {targets['peak']:6.0f} MiB  "
            f"{verdict(targets['peak'] < total_mib / 2)}"
        )
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
