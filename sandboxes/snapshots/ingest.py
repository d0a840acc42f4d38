"""Reading files into blobs for a snapshot, on two cores.

The walk reads small files itself; large files are read on a thread of their own (`LargeFiles`) while the walk
goes on. Almost everything a large file costs - reading, cutting, hashing, compressing - runs in C without the
GIL, so that thread and the walk's per-file Python work really do run at once; pack writes run on the pack
writer's upload threads. A large file's entry is handed to the tree builder at once with a placeholder chunk
that no pack seal resolves, so the builder holds it (and everything after it, keeping the tree's order) until
the thread fills it in. Memory stays bounded: a few queued files, one chunk window, the packs being written.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import blake3
import pyfastcdc

from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.packs import PackWriter, blob_hash

MAX_QUEUED = 4  # large files waiting for the thread (each holds a duplicated folder descriptor)
HASH_AHEAD = 8  # chunks waiting for the whole-file hash (at most 8 x CHUNK_MAX of memory)
PENDING = t.ChunkRef("", "~reading", 0, 0, 0, 0)  # never sealed: `PackWriter.open_pack_has` is true for it


class ReadFile(Protocol):
    """Reads one file completely, here and now, into its entry (whole-file hashes on ``hash_pool``)."""

    def __call__(
        self,
        root_fd: int,
        path: str,
        st: os.stat_result,
        writer: PackWriter,
        chunker: pyfastcdc.FastCDC,
        *,
        hash_pool: Executor | None = None,
    ) -> t.Entry: ...


def read_small(fd: int, size: int) -> bytes:
    """A small file's bytes in one read when it still has the ``size`` it was walked with. A file that grew
    shows as ``size`` + 1 bytes (the caller compares sizes and reads it again); short reads are followed up."""
    data = os.read(fd, size + 1)
    if 0 < len(data) < size:  # a short read before the end (some filesystems do that): read on until EOF
        parts = [data]
        got = len(data)
        while got <= size and (more := os.read(fd, size + 1 - got)):
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def store_small(data: bytes, writer: PackWriter) -> tuple[list[t.ChunkRef], str]:
    """Store a small file as one blob; returns its chunk list and content hash."""
    content_hash = blob_hash(data)
    # Unencrypted, a small file's blob id is its content hash: no need to hash it twice.
    blob = content_hash if writer.encryption is None else None
    return ([writer.add(data, blob)] if data else []), content_hash


def store_chunked(
    fd: int, writer: PackWriter, chunker: pyfastcdc.FastCDC, hash_pool: Executor | None = None
) -> tuple[list[t.ChunkRef], int, str]:
    """Cut a large file into content-defined chunks and store them; returns the chunk list, the bytes read and
    the content hash (BLAKE3 of the whole file), computed on ``hash_pool`` (one thread) if given."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a cold file: read ahead harder
    hasher = blake3.blake3()  # fed 512 KiB at a time: large inputs hash without the GIL
    hashing: deque[Future[blake3.blake3]] = deque()
    chunks, size = [], 0
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            for chunk in chunker.cut_stream(f):
                # FastCDC reuses its buffer between chunks: one copy, which the pack keeps and the hasher reads.
                # Reusing memory beats fresh blocks, whose page faults cost more than the copy on these machines.
                data = bytes(chunk.data)
                if hash_pool is None:
                    hasher.update(data)
                else:
                    hashing.append(hash_pool.submit(hasher.update, data))
                    if len(hashing) > HASH_AHEAD:
                        hashing.popleft().result()
                chunks.append(writer.add(data))
                size += len(data)
        while hashing:
            hashing.popleft().result()
    finally:
        for pending in hashing:
            pending.cancel()
    return chunks, size, hasher.hexdigest()


@dataclass
class _Job:
    dir_fd: int  # a duplicate of the walk's folder descriptor, owned by the job
    path: str
    st: os.stat_result
    entry: t.Entry  # the placeholder the tree builder holds


class LargeFiles:
    """One thread that reads large files into the pack writer while the walk goes on (a `packs.Feeder`).

    `submit` returns the file's entry at once, with the `PENDING` chunk; the thread fills in its hash and chunks
    (the chunks last, so an entry that no longer looks pending is complete). The first error stops the thread and
    is raised by the next `submit` or `drain`; `close` stops it and closes every descriptor, whatever happened.
    """

    def __init__(self, writer: PackWriter, read: ReadFile, chunker: Callable[[], pyfastcdc.FastCDC]) -> None:
        self._writer = writer
        self._read = read
        self._chunker = chunker
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._busy = False
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The whole-file hash on a third thread: the reading thread has the most to do (read, cut, copy, hash
        # and compress each chunk) while the walk's thread soon waits, so this evens out the two cores.
        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot-file-hash")

    def submit(self, root_fd: int, path: str, st: os.stat_result) -> t.Entry:
        entry = t.Entry(path, t.FILE, chunks=[PENDING])
        with self._cv:
            while len(self._jobs) >= MAX_QUEUED and self._error is None:
                self._cv.wait()
            self._raise_error()
            if self._stopping:
                raise RuntimeError("large-file reader already closed")
            self._jobs.append(_Job(os.dup(root_fd), path, st, entry))
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="snapshot-large-files", daemon=True)
            self._thread.start()
        return entry

    def drain(self) -> None:
        """Wait until every submitted file is read; raise the thread's error if one failed."""
        with self._cv:
            while (self._jobs or self._busy) and self._error is None:
                self._cv.wait()
            self._raise_error()

    def close(self) -> None:
        """Stop the thread (a file being read is finished first) and close the descriptors of files not read."""
        with self._cv:
            self._stopping = True
            dropped, self._jobs = list(self._jobs), deque()
            self._cv.notify_all()
        for job in dropped:
            os.close(job.dir_fd)
        if self._thread is not None:
            self._thread.join()
        self._hash_pool.shutdown(wait=True, cancel_futures=True)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        chunker = self._chunker()
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                read = self._read(job.dir_fd, job.path, job.st, self._writer, chunker, hash_pool=self._hash_pool)
                # Fill in the placeholder the builder holds; its chunks last: from then on it reads as complete.
                entry = job.entry
                entry.mode, entry.mtime_ns, entry.size, entry.hash = read.mode, read.mtime_ns, read.size, read.hash
                entry.chunks = read.chunks
            except BaseException as e:  # raised by the walk's next submit or drain: this thread only stops
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            finally:
                os.close(job.dir_fd)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
