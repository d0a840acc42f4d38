"""The remote mirror: a folder on the worker kept equal to a remote sandbox's selected paths.

Snapshots of E2B and Modal sandboxes run the portable engine on this folder (sandboxes/remote.py moves bytes in
and out through the provider's SDK). Everything here is the worker's side of that sync, blocking file I/O meant
for ``asyncio.to_thread``:

* `read_listing` parses the sandbox's listing (``find -printf FIND_FORMAT``: type, mode, size, mtime, ctime,
  inode, link count, path and link target, NUL-separated) into `RemoteEntry` records;
* `apply_listing` makes the mirror's folders, symlinks and deletions match, and says which files to fetch,
  comparing each with the `SyncIndex` - the remote and mirror stat recorded when both were last known equal;
* `unpack` writes the fetched files from the tar stream the sandbox sent; `settle` sets modes and mtimes exactly;
* `plan_push` and `build_tar` go the other way, after a restore into the mirror.

Large changed files that both sides hold a version of skip the tar: sandboxes/block_delta.py moves only their
differing blocks (`SyncStats.patched` counts them), and sends them whole whenever anything about that is off.

Trust: the listing and the tar come out of the sandbox, and root inside it can rewrite both. So every name is
checked (relative, no ``..``; `read_listing` refuses the whole listing otherwise), every write goes through
`SafeFolders` (no symlink on the way is ever followed), the tar may only hold regular files and hard links that
were asked for, of exactly the announced size, in an archive no bigger than those sizes need, and no mode bit the
snapshot engine would drop (setuid, setgid) ever reaches a file on the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tardigrade.sandboxes.errors import SandboxError, UnsafePath, WorkspaceChanged
from tardigrade.sandboxes.safe_folders import SafeFolders, relative_problem
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots.create import MODE_MASK
from tardigrade.sandboxes.snapshots.walk import Walker

FIND_FORMAT = r"%y\0%m\0%s\0%T@\0%C@\0%i\0%n\0%p\0%l\0"
_FIELDS = 9
_MAX_FIELD = 64 * 1024  # no path or link target comes near this; a longer "field" is not a listing
_TAR_OVERHEAD = 8 * 1024  # per member: header, pax header (long names, nanosecond times), padding


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    kind: str  # f, d, l (anything else is skipped)
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    link: str

    @property
    def sig(self) -> str:
        """What says a remote file was not touched: size, mtime, ctime, inode and mode."""
        return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.ino}:{self.mode}"


@dataclass
class SyncStats:
    listed: int = 0
    transferred: int = 0  # files brought over, whole or as block deltas
    bytes: int = 0  # their bytes that crossed (for a block delta, the blocks sent)
    patched: int = 0  # of those, files sent as block deltas (sandboxes/block_delta.py)
    deleted: int = 0
    seconds: float = 0.0


def _refused(rel: str, problem: str) -> SandboxError:
    return SandboxError(
        f"the sandbox's file listing names {rel!r}, which {problem}; refusing the listing (were the helper commands"
        " in the sandbox tampered with?)"
    )


# -- the listing ----------------------------------------------------------------------------------------------------


def _ns(text: str) -> int:
    """find's ``%T@`` ("1700000000.1234567890") as integer nanoseconds, exactly."""
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def parse_listing(stream: IO[bytes]) -> Iterator[tuple[str, RemoteEntry]]:
    """Records of ``find -printf FIND_FORMAT``: nine NUL-terminated fields each, read in blocks. Paths are checked:
    a name that is absolute or holds an empty, ``.`` or ``..`` part fails the whole listing."""
    pending = b""
    fields: list[bytes] = []
    while block := stream.read(1 << 20):
        parts = (pending + block).split(b"\0")
        pending = parts.pop()
        if len(pending) > _MAX_FIELD:
            raise SandboxError(f"the sandbox's file listing has a field longer than {_MAX_FIELD} bytes; refusing it")
        for part in parts:
            fields.append(part)
            if len(fields) == _FIELDS:
                kind, mode, size, mtime, ctime, ino, nlink, path, link = fields
                fields = []
                rel = os.fsdecode(path)
                rel = rel[2:] if rel.startswith("./") else ("" if rel == "." else rel)
                if rel:
                    problem = relative_problem(rel)
                    if problem is not None:
                        raise _refused(rel, problem)
                try:
                    entry = RemoteEntry(
                        kind.decode(), int(mode, 8), int(size), _ns(mtime.decode()), _ns(ctime.decode()), int(ino),
                        int(nlink), os.fsdecode(link),
                    )  # fmt: skip
                except ValueError:
                    raise _refused(rel, "has a malformed record") from None
                yield rel, entry
    if pending or fields:
        raise SandboxError("the sandbox's file listing ended in the middle of a record (truncated?)")


def read_listing(path: Path, selection: Selection) -> dict[str, RemoteEntry]:
    """The selected entries of a downloaded listing, by path relative to the listed root ("" is left out)."""
    entries: dict[str, RemoteEntry] = {}
    with open(path, "rb") as f:
        for rel, entry in parse_listing(f):
            if rel and selection.covers(rel) and not _excluded(selection, rel):
                entries[rel] = entry
    return entries


def _excluded(selection: Selection, rel: str) -> bool:
    """Whether ``rel`` or a folder above it is excluded (the walk prunes excluded folders)."""
    parts = rel.split("/")
    return any(selection.excluded("/".join(parts[:i])) for i in range(1, len(parts) + 1))


# -- the sync index -------------------------------------------------------------------------------------------------


def mirror_sig(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{stat.S_IMODE(st.st_mode)}"


class SyncIndex:
    """path -> (remote signature, mirror signature) of files last known to hold the same content on both sides."""

    FORMAT = "tardigrade-syncindex/1"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, str]] = {}
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                if json.loads(f.readline() or "{}").get("format") == self.FORMAT:
                    for line in f:
                        rel, remote, mirror = json.loads(line)
                        self.entries[rel] = (remote, mirror)
        except (OSError, ValueError):
            self.entries = {}  # no index: nothing is trusted, everything is compared in full

    def save(self, entries: dict[str, tuple[str, str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps({"format": self.FORMAT}) + "\n")
            for rel in sorted(entries):
                f.write(json.dumps([rel, *entries[rel]]) + "\n")
        os.replace(tmp, self.path)
        self.entries = entries

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entries = {}


# -- the local side -------------------------------------------------------------------------------------------------


def local_entries(root: Path, selection: Selection) -> dict[str, os.stat_result]:
    """Every covered path under ``root`` (ancestors of roots left out), never following symlinks."""
    return {path: st for path, st, ancestor in Walker(str(root), selection) if not ancestor}


def _kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISLNK(st.st_mode):
        return "l"
    if stat.S_ISREG(st.st_mode):
        return "f"
    return "?"


def _readlink(folders: SafeFolders, rel: str) -> str:
    try:
        return folders.readlink(rel)
    except (OSError, UnsafePath):
        return ""


def _by_depth(paths: Iterable[str]) -> list[str]:
    """Parents before children, siblings by name."""
    return sorted(paths, key=lambda p: p.split("/"))


# -- pull: sandbox -> mirror ----------------------------------------------------------------------------------------


def apply_listing(
    root: Path, remote: dict[str, RemoteEntry], selection: Selection, index: SyncIndex, stats: SyncStats
) -> list[str]:
    """Make the mirror's folders, symlinks and deletions match the listing; return the files to fetch (sorted)."""
    local = local_entries(root, selection)
    with SafeFolders(root) as folders:
        # Deletions and type changes first (deepest first), so new entries have room.
        for rel in sorted(local, key=lambda p: p.count("/"), reverse=True):
            want = remote.get(rel)
            current = local[rel]
            if want is None or _kind(current) != want.kind or (want.kind == "l" and _readlink(folders, rel)
                                                               != want.link):  # fmt: skip
                folders.remove(rel)
                local.pop(rel)
                stats.deleted += 1
        fetch: list[str] = []
        inodes: dict[int, list[str]] = {}
        for rel in _by_depth(remote):
            entry = remote[rel]
            if entry.kind == "d":
                have = local.get(rel)
                if have is None or have.st_mode & 0o700 != 0o700:
                    parent, name = folders.parent_of(rel, create=True)
                    if have is None:
                        os.mkdir(name, 0o700, dir_fd=parent)
                    else:  # room to write into; the exact mode is set at the end
                        os.chmod(name, stat.S_IMODE(have.st_mode) | 0o700, dir_fd=parent)
            elif entry.kind == "l":
                if rel not in local:
                    parent, name = folders.parent_of(rel, create=True)
                    os.symlink(entry.link, name, dir_fd=parent)
                    os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
            elif entry.kind == "f":
                if entry.nlink > 1:
                    inodes.setdefault(entry.ino, []).append(rel)
                known = index.entries.get(rel)
                have = local.get(rel)
                if not (known and have and known == (entry.sig, mirror_sig(have))):
                    fetch.append(rel)
    # A hard-linked file is fetched with all its links, so the mirror keeps them linked.
    wanted = set(fetch)
    for group in inodes.values():
        if wanted.intersection(group):
            wanted.update(group)
    return _by_depth(wanted)


def tar_limit(paths: list[str], remote: dict[str, RemoteEntry]) -> int:
    """The most bytes a tar of ``paths`` can take, sizes as listed: a bigger archive is not what was asked for."""
    return sum(-(-remote[p].size // 512) * 512 + _TAR_OVERHEAD + 2 * len(os.fsencode(p)) for p in paths) + 10240


def unpack(root: Path, archive_path: Path, paths: list[str], remote: dict[str, RemoteEntry]) -> tuple[int, int]:
    """Write the regular files (and hard links between them) of the tar the sandbox sent for ``paths`` into the
    mirror. Returns (files written, bytes)."""
    limit = tar_limit(paths, remote)
    if archive_path.stat().st_size > limit:
        raise SandboxError(
            f"the sandbox sent a {archive_path.stat().st_size:,}-byte archive for {len(paths)} file(s) that the"
            f" listing says need at most {limit:,}; refusing it"
        )
    wanted = set(paths)
    done: set[str] = set()
    written = size = 0
    with SafeFolders(root) as folders, tarfile.open(archive_path, "r|") as archive:
        for member in archive:
            rel = member.name.removeprefix("./")
            if rel not in wanted or rel in done:
                raise SandboxError(f"the sandbox sent {rel!r}, which was not asked for (or twice); refusing it")
            done.add(rel)
            entry = remote[rel]
            if member.islnk():
                target = member.linkname.removeprefix("./")
                if target not in done:
                    raise SandboxError(f"{rel!r} is sent as a link to {target!r}, which was not sent before it")
                folders.remove(rel)
                folders.hardlink(target, rel, create=True)
            elif member.isreg():
                if member.size != entry.size:  # before a byte is written: the listing bounds what we take
                    raise WorkspaceChanged(
                        f"file {rel!r} changed while it was copied out of the sandbox ({member.size:,} bytes sent,"
                        f" {entry.size:,} listed); is a process still writing it?"
                    )
                source = archive.extractfile(member)
                assert source is not None
                folders.remove(rel)
                parent, name = folders.parent_of(rel, create=True)
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=parent)  # fmt: skip
                with os.fdopen(out, "wb") as dst:
                    shutil.copyfileobj(source, dst, 1 << 20)
                size += member.size
            else:
                raise SandboxError(f"the sandbox sent {rel!r} as a {member.type!r} entry; expected a file")
            written += 1
    if written != len(paths):
        raise WorkspaceChanged(f"{len(paths) - written} file(s) vanished while they were copied out of the sandbox")
    return written, size


def settle(root: Path, remote: dict[str, RemoteEntry]) -> dict[str, tuple[str, str]]:
    """Give the mirror's files and folders the listing's modes (less setuid/setgid, which the snapshot engine does
    not keep either) and exact mtimes; return the new sync index entries."""
    new_index: dict[str, tuple[str, str]] = {}
    with SafeFolders(root) as folders:
        for rel in sorted(remote, key=lambda p: p.count("/"), reverse=True):  # folders' mtimes last
            entry = remote[rel]
            if entry.kind not in ("f", "d"):
                continue
            parent, name = folders.parent_of(rel)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            # Only touch what differs: chmod and utime bump the ctime the stat cache keys on.
            mode = entry.mode & MODE_MASK
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(name, mode, dir_fd=parent, follow_symlinks=False)
            if st.st_mtime_ns != entry.mtime_ns:
                os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
            if entry.kind == "f":
                new_index[rel] = (entry.sig, mirror_sig(os.stat(name, dir_fd=parent, follow_symlinks=False)))
    return new_index


# -- push: mirror -> sandbox ----------------------------------------------------------------------------------------


@dataclass
class PushPlan:
    local: dict[str, os.stat_result]
    delete: list[str]  # remote paths to delete (a folder's contents are not listed separately)
    send: list[str]  # local paths to send, parents first ("" is the root itself)


def plan_push(
    root: Path, remote: dict[str, RemoteEntry], selection: Selection, index: SyncIndex, *, with_root: bool
) -> PushPlan:
    """What to delete in the sandbox and what to send so its selected paths equal the mirror's (or a staged
    mount's): what differs by the sync index, everything when there is none. ``remote`` is consumed."""
    local = local_entries(root, selection)
    delete: list[str] = []
    with SafeFolders(root) as folders:
        for rel in _by_depth(remote):
            have = remote[rel]
            want = local.get(rel)
            if want is None or _kind(want) != have.kind or (have.kind == "l" and _readlink(folders, rel)
                                                            != have.link):  # fmt: skip
                if not any(rel.startswith(d + "/") for d in delete[-1:]):
                    delete.append(rel)
                remote.pop(rel)
    send: list[str] = []
    for rel in _by_depth(local):
        st = local[rel]
        have_entry = remote.get(rel)
        kind = _kind(st)
        if kind == "f":
            known = index.entries.get(rel)
            if have_entry is None or not known or known != (have_entry.sig, mirror_sig(st)):
                send.append(rel)
        elif kind == "d":
            if (
                have_entry is None
                or have_entry.mode != stat.S_IMODE(st.st_mode)
                or (have_entry.mtime_ns != st.st_mtime_ns)
            ):
                send.append(rel)
        elif kind == "l" and have_entry is None:
            send.append(rel)
    # Folders whose content changes get their mtime back from the archive (tar sets them last).
    touched = {p.rpartition("/")[0] for p in [*send, *delete]}
    send = _by_depth(set(send) | {p for p in touched if p in local})
    if with_root:
        send = ["", *[p for p in send if p]]
    return PushPlan(local, delete, send)


def pushed_index(local: dict[str, os.stat_result], after: dict[str, RemoteEntry]) -> dict[str, tuple[str, str]]:
    """What is now known equal: the sandbox's stat after a push against the mirror's."""
    new_index: dict[str, tuple[str, str]] = {}
    for rel, st in local.items():
        entry = after.get(rel)
        if entry is not None and entry.kind == "f" and stat.S_ISREG(st.st_mode) and entry.size == st.st_size:
            new_index[rel] = (entry.sig, mirror_sig(st))
    return new_index


def adopted_index(root: Path, selection: Selection, remote: dict[str, RemoteEntry]) -> dict[str, tuple[str, str]]:
    """After a native-snapshot resume filled the mirror from the store: trust files whose size, mtime (to the
    microsecond) and mode already agree with the sandbox's."""
    trusted: dict[str, tuple[str, str]] = {}
    for rel, st in local_entries(root, selection).items():
        entry = remote.get(rel)
        if (
            entry is not None and entry.kind == "f" and stat.S_ISREG(st.st_mode) and entry.size == st.st_size
            and entry.mtime_ns // 1000 == st.st_mtime_ns // 1000 and entry.mode == stat.S_IMODE(st.st_mode)
        ):  # fmt: skip
            trusted[rel] = (entry.sig, mirror_sig(st))
    return trusted


def build_tar(root: Path, paths: list[str], out: Path, owner: int, root_mode: int | None) -> tuple[int, int]:
    """A POSIX tar of ``paths`` with exact nanosecond mtimes, owned by ``owner``; never follows symlinks."""
    files = size = 0
    inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive, SafeFolders(root) as folders:
        for rel in paths:
            st = folders.lstat(rel) if rel else os.lstat(root)
            info = tarfile.TarInfo("./" + rel if rel else ".")
            info.uid = info.gid = owner
            info.uname = info.gname = ""
            info.mode = stat.S_IMODE(st.st_mode) if not (rel == "" and root_mode is not None) else root_mode
            info.mtime = st.st_mtime_ns / 1e9
            seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
            info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = folders.readlink(rel)
                archive.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                first = inodes.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
                if first != rel:
                    info.type = tarfile.LNKTYPE
                    info.linkname = "./" + first
                    archive.addfile(info)
                else:
                    info.size = st.st_size
                    fd = folders.open_regular(rel, os.O_RDONLY)
                    with os.fdopen(fd, "rb") as f:
                        archive.addfile(info, f)
                    size += st.st_size
                files += 1
    return files, size
