"""Block deltas between the mirror and a remote sandbox: move only the 1 MiB blocks of a large file that differ.

A 1-byte change in a 100 MB file should not move 100 MB through an SDK. For a changed file of at least
`MIN_SIZE` that both sides hold a version of, the side that has the new content is compared block by block with
the other: the sandbox hashes its file in fixed blocks (`HASH_SCRIPT`), the worker hashes its copy, and only the
differing blocks cross - pulled out with `EXTRACT_SCRIPT`, or pushed in and applied with `PATCH_SCRIPT`.

Why shell, dd and sha256sum: every Debian/Ubuntu image E2B, Modal and Daytona start from has GNU coreutils; many
have no python3, and uploading a helper binary means one per architecture. The scripts need GNU dd's
``iflag=nofollow,fullblock`` (a symlink swapped in is never read; a block is read whole); an image without them
(busybox) fails the preflight and the files go whole, as before. Cost: one ``dd | sha256sum`` pair per block, about
1.4 s of sandbox time for 100 MB on a loaded 2-core machine (python3's hashlib would take 0.35 s; the bytes saved
dwarf either).

Trust: what the sandbox sends is hostile. The block list is parsed strictly (one size line equal to the listing's,
then exactly one 64-hex-digit line per block), its size is bounded before download, the blocks must add up to
exactly the bytes asked for, and the patched file is written beside the old copy under a new name and renamed over
it only when every block of it hashes to what the sandbox claimed and its size is the listed size. Anything else
leaves the mirror's copy untouched and sends the file whole through the ordinary tar path. A sandbox that lies
consistently (claims hashes of the bytes it then sends) only gets what it could have written into the file itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.errors import UnsafePath
from tardigrade.sandboxes.safe_folders import SafeFolders

BLOCK_SIZE = 1 << 20
MIN_SIZE = 1 << 20  # below this, the round trips cost more than sending the file
MAX_BLOCKS = 16384  # a file's block numbers travel as one shell argument (at most 128 KiB): 16 GiB files at most
MAX_SHARE = 0.75  # when more of a file than this differs, sending it whole is cheaper than hashing it twice
MAX_FILES = 2000  # per run: bounds the argument lists and the push script's output

_HEX64 = re.compile(rb"[0-9a-f]{64}")

# Each script is uploaded as a file that starts with ``set -- <quoted arguments>`` (no command-line length limit
# applies) and runs as root with the synced root as its working directory.

# Preflight: GNU dd with the flags the scripts rely on; a sandbox without them sends files whole.
PREFLIGHT = "dd if=/dev/null of=/dev/null iflag=nofollow,fullblock,skip_bytes,count_bytes 2>/dev/null || exit 4"

# Arguments: paths (./relative). Output per path: its size then one sha256 per block, or "-" if not a regular file.
# With python3 in the image, one process hashes everything (4x faster than a dd and a sha256sum per block).
PYTHON_HASH = f"""if command -v python3 >/dev/null 2>&1; then python3 - "$@" <<'PYTHON'
import hashlib, os, stat, sys
out = sys.stdout.buffer
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        out.write(b"-\\n")
        continue
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            out.write(b"-\\n")
            continue
        out.write(b"%d\\n" % st.st_size)
        left = st.st_size
        while left > 0:
            block = f.read(min({BLOCK_SIZE}, left))
            if not block:
                break
            left -= len(block)
            out.write(hashlib.sha256(block).hexdigest().encode() + b"\\n")
PYTHON
exit $?
fi
"""
SHELL_HASH = (
    f"B={BLOCK_SIZE}; for f; do"
    ' if [ -f "$f" ] && [ ! -L "$f" ] && s=$(stat -c %s -- "$f"); then echo "$s"; n=$(( (s + B - 1) / B )); i=0;'
    ' while [ $i -lt $n ]; do dd if="$f" iflag=nofollow,fullblock bs=$B skip=$i count=1 2>/dev/null'
    " | sha256sum | cut -c1-64; i=$((i + 1)); done;"
    " else echo -; fi; done"
)
HASH_SCRIPT = PYTHON_HASH + SHELL_HASH

# Arguments: pairs of (path, block numbers separated by spaces). Output: those blocks, concatenated in order.
EXTRACT_SCRIPT = (
    "while [ $# -ge 2 ]; do f=$1 blocks=$2; shift 2; for i in $blocks; do"
    f' dd if="$f" iflag=nofollow,fullblock bs={BLOCK_SIZE} skip=$i count=1 2>/dev/null || exit 5; done; done'
)

# Arguments: blob path, then groups of 9 (index, path, size, offset of its first block in the blob, block numbers,
# sha256 of the whole new file, owner, octal mode, mtime as seconds.nanoseconds). Builds the new file beside the
# old one from a copy of it and the sent blocks, checks its hash, then renames it over; prints "ok <index>" for each
# file it replaced. A file that fails is left as it was (the worker sends it whole).
PATCH_SCRIPT = (
    f"B={BLOCK_SIZE}; blob=$1; shift; while [ $# -ge 9 ]; do"
    " k=$1 f=$2 s=$3 pos=$4 blocks=$5 sum=$6 owner=$7 mode=$8 mtime=$9; shift 9;"
    ' [ -f "$f" ] && [ ! -L "$f" ] || continue;'
    ' t="$(dirname -- "$f")/.tardigrade-delta-$$-$k";'
    ' if cp -- "$f" "$t" && truncate -s "$s" "$t" && {'
    " ok=0; for i in $blocks; do l=$((s - i * B)); [ $l -gt $B ] && l=$B;"
    ' dd if="$blob" of="$t" bs=$B iflag=skip_bytes,count_bytes,fullblock skip=$pos seek=$i count=$l conv=notrunc'
    " 2>/dev/null || { ok=1; break; }; pos=$((pos + l)); done; [ $ok = 0 ]; }"
    ' && [ "$(sha256sum < "$t" | cut -c1-64)" = "$sum" ]'
    ' && chown "$owner:$owner" "$t" && chmod "$mode" "$t" && touch -m -d "@$mtime" "$t" && mv -f -- "$t" "$f";'
    ' then echo "ok $k"; else rm -f -- "$t"; fi; done'
)


def script(body: str, arguments: Iterable[str]) -> bytes:
    """A shell script file: the arguments (paths may be any bytes), the preflight, then ``body``."""
    quoted = b" ".join(_quote(os.fsencode(a)) for a in arguments)
    return b"set -- " + quoted + b"\n" + PREFLIGHT.encode() + b"\n" + body.encode() + b"\n"


def _quote(raw: bytes) -> bytes:
    return b"'" + raw.replace(b"'", b"'\\''") + b"'"


class ManifestInvalid(Exception):
    """The sandbox's block list is not what was asked for; every file of it goes whole."""


def block_count(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def block_length(size: int, index: int) -> int:
    return min(BLOCK_SIZE, size - index * BLOCK_SIZE)


def worth_it(size: int) -> bool:
    """Whether a file of ``size`` bytes is compared by blocks rather than sent whole."""
    return size >= MIN_SIZE and block_count(size) <= MAX_BLOCKS


def manifest_limit(sizes: Iterable[int]) -> int:
    """The most bytes an honest block list for files of ``sizes`` takes (a size line, 65 bytes per block)."""
    return sum(21 + 65 * block_count(size) for size in sizes)


def parse_manifest(data: bytes, sizes: list[int]) -> list[list[str] | None]:
    """The claimed block hashes of each file, in order; None for a file that is not (or no longer) the listed one:
    not a regular file, or of another size. Raises `ManifestInvalid` when the list is malformed anywhere."""
    if data and not data.endswith(b"\n"):
        raise ManifestInvalid("the block list does not end with a newline")
    lines = data.split(b"\n")[:-1] if data else []
    position = 0
    result: list[list[str] | None] = []
    for listed in sizes:
        if position >= len(lines):
            raise ManifestInvalid("the block list ends early")
        head = lines[position]
        position += 1
        if head == b"-":
            result.append(None)
            continue
        if not head.isdigit() or len(head) > 20:
            raise ManifestInvalid(f"a size line is {head[:40]!r}")
        claimed = int(head)
        count = block_count(claimed)
        hashes = lines[position : position + count]
        if len(hashes) != count or not all(_HEX64.fullmatch(h) for h in hashes):
            raise ManifestInvalid("a file's block hashes are missing or malformed")
        position += count
        result.append([h.decode() for h in hashes] if claimed == listed else None)
    if position != len(lines):
        raise ManifestInvalid(f"the block list has {len(lines) - position} line(s) more than asked for")
    return result


# -- the worker's side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalBlocks:
    size: int
    hashes: list[str]
    sha256: str  # of the whole file


def local_blocks(root: Path, rel: str) -> LocalBlocks | None:
    """Block hashes of the mirror's regular file at ``rel`` (None if there is none to compare with)."""
    try:
        with SafeFolders(root) as folders:
            fd = folders.open_regular(rel, os.O_RDONLY)
    except (OSError, UnsafePath):
        return None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not worth_it(size):
            return None
        whole = hashlib.sha256()
        hashes = []
        while block := f.read(BLOCK_SIZE):
            whole.update(block)
            hashes.append(hashlib.sha256(block).hexdigest())
    return LocalBlocks(size, hashes, whole.hexdigest())


def all_local_blocks(root: Path, paths: list[str]) -> list[LocalBlocks | None]:
    return [local_blocks(root, rel) for rel in paths]


def differing(claimed: list[str], have: list[str]) -> list[int]:
    """Block numbers of ``claimed`` that ``have`` does not hold at the same place."""
    return [i for i, h in enumerate(claimed) if i >= len(have) or have[i] != h]


def regular_candidates(root: Path, paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` the mirror holds as a regular file big enough to compare by blocks."""
    found = []
    with SafeFolders(root) as folders:
        for rel in paths:
            try:
                st = folders.lstat(rel)
            except (OSError, UnsafePath):
                continue
            if stat.S_ISREG(st.st_mode) and worth_it(st.st_size):
                found.append(rel)
    return found


def patch(
    root: Path,
    rel: str,
    size: int,
    claimed: list[str],
    fetched: dict[int, int],
    blob: Path,
    old_hashes: list[str] | None = None,
) -> bool:
    """Write the new version of the mirror's ``rel``: blocks in ``fetched`` (block number -> offset in ``blob``)
    from the blob, the others from the old copy. It is built under a new name and renamed over the old copy only if
    every block hashes to ``claimed`` and it is ``size`` bytes long; otherwise the old copy stays and False says so.
    ``old_hashes`` (the old copy's block hashes, just computed by `local_blocks`) spares hashing its reused blocks
    again: they are copied by the kernel."""
    if len(claimed) != block_count(size):
        return False
    with SafeFolders(root) as folders:
        try:
            old = folders.open_regular(rel, os.O_RDONLY)
            parent, name = folders.parent_of(rel)
        except (OSError, UnsafePath):
            return False
        temp = f".tardigrade-delta-{uuid.uuid4().hex}"
        replaced = False
        try:
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=parent)  # fmt: skip
            with os.fdopen(out, "wb", buffering=0) as dst, open(blob, "rb") as sent:
                for index, want in enumerate(claimed):
                    length = block_length(size, index)
                    if (
                        index not in fetched
                        and old_hashes is not None
                        and index < len(old_hashes)
                        and (old_hashes[index] == want)
                    ):
                        if _copy_range(old, dst.fileno(), length, index * BLOCK_SIZE) != length:
                            return False
                        continue
                    if index in fetched:
                        sent.seek(fetched[index])
                        data = sent.read(length)
                    else:
                        data = os.pread(old, length, index * BLOCK_SIZE)
                    if len(data) != length or hashlib.sha256(data).hexdigest() != want:
                        return False
                    _write_all(dst.fileno(), data)
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            replaced = True
            return True
        finally:
            os.close(old)
            if not replaced:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=parent)


def append_blocks(root: Path, rel: str, size: int, blocks: list[int], out: Path) -> int:
    """Append blocks ``blocks`` of the worker's regular file ``rel`` (``size`` bytes) to ``out``; bytes written."""
    with SafeFolders(root) as folders:
        fd = folders.open_regular(rel, os.O_RDONLY)
    written = 0
    try:
        with open(out, "ab") as sink:
            for index in blocks:
                data = os.pread(fd, block_length(size, index), index * BLOCK_SIZE)
                if len(data) != block_length(size, index):
                    raise OSError(f"{rel!r} in the mirror shrank while its blocks were gathered")
                sink.write(data)
                written += len(data)
    finally:
        os.close(fd)
    return written


def patched_indexes(output: bytes, count: int) -> set[int]:
    """The files the patch script says it replaced ("ok <index>" lines; anything else is ignored)."""
    done = set()
    for line in output.split(b"\n"):
        word, _, number = line.partition(b" ")
        if word == b"ok" and number.isdigit() and int(number) < count:
            done.add(int(number))
    return done


def _copy_range(source: int, target: int, length: int, offset: int) -> int:
    """Copy ``length`` bytes at ``offset`` of ``source`` to the same offset of ``target`` (whose position is there),
    in the kernel where it can; returns the bytes copied (fewer if ``source`` ended)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(source, target, length - done, offset + done)
        except OSError:
            n = -1
        if n <= 0:  # not supported here, or the source ended: fall back to (or finish with) read and write
            data = os.pread(source, length - done, offset + done)
            if not data:
                break
            _write_all(target, data)
            n = len(data)
        done += n
    return done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
