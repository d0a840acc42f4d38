"""Reading one workspace file into the store: the chunking parameters, the read that retries if the file changes
under it, and the re-hash of a file whose stat is too fresh to trust. Shared by the walking (create.py) and the
spliced (spliced.py) snapshots, so both cut and record a file exactly alike.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Executor

import blake3
import pyfastcdc

from tardigrade.sandboxes.errors import WorkspaceChanged
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.ingest import LargeFiles, read_small, store_chunked, store_small
from tardigrade.sandboxes.snapshots.packs import PackWriter
from tardigrade.sandboxes.snapshots.statcache import stat_key

LARGE_FILE = 1 << 20  # files from this size on are cut into chunks
CHUNK_AVG, CHUNK_MIN, CHUNK_MAX = 512 << 10, 256 << 10, 2 << 20  # a one-byte edit stores ~0.8 MiB
MODE_MASK = 0o1777  # setuid/setgid are never recorded: a restored file must not gain privileges on the host


def new_chunker() -> pyfastcdc.FastCDC:
    """The content-defined chunker every snapshot cuts large files with: the same cuts make the same chunks."""
    return pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)


def _read_file(
    root_fd: int,
    path: str,
    st: os.stat_result,
    writer: PackWriter,
    chunker: pyfastcdc.FastCDC,
    *,
    now: bool = False,
    hash_pool: Executor | None = None,
) -> t.Entry:
    """Read one regular file into blobs. Retries once if it changes under us, then gives up loudly.

    A large file is read on the writer's feeder thread while the walk goes on (ingest.py): its entry comes back
    at once as a placeholder the tree builder holds until the thread completed it (``now``: read it here, with
    its whole-file hash on ``hash_pool`` if given)."""
    if st.st_size >= LARGE_FILE and not now:
        if writer.feeder is None:
            read_now = functools.partial(_read_file, now=True)
            same = functools.partial(pyfastcdc.FastCDC, chunker.avg_size, min_size=chunker.min_size)
            writer.feeder = LargeFiles(writer, read_now, functools.partial(same, max_size=chunker.max_size))
        assert isinstance(writer.feeder, LargeFiles)
        return writer.feeder.submit(root_fd, path, st)
    for _ in range(2):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        try:
            if st.st_size < LARGE_FILE:
                data = read_small(fd, st.st_size)
                chunks, content_hash = store_small(data, writer)
                size = len(data)
            else:
                chunks, size, content_hash = store_chunked(fd, writer, chunker, hash_pool)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if size == after.st_size and after.st_mtime_ns == st.st_mtime_ns and size == st.st_size:
            return t.Entry(
                path, t.FILE, st.st_mode & MODE_MASK, st.st_mtime_ns, size, content_hash or t.EMPTY_HASH, chunks
            )
        st = after
    raise WorkspaceChanged(f"file {path!r} kept changing while it was snapshotted; is a process still writing it?")


def _hash_file(root_fd: int, path: str, st: os.stat_result) -> str | None:
    """The content hash of a file whose stat is unchanged but too fresh to vouch for it (see statcache.py), or
    None if it changed while being read (then it is read as changed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        hasher = blake3.blake3()
        size = 0
        while block := os.read(fd, 1 << 20):
            hasher.update(block)
            size += len(block)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if size != st.st_size or stat_key(after) != stat_key(st):
        return None
    return hasher.hexdigest() if size else t.EMPTY_HASH
