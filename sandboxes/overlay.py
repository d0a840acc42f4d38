"""Overlay upper layers for the local sandbox: know what a step changed without walking, drop a failed attempt in O(1).

Each bubblewrap command sees ``/workspace`` and ``/home/sandbox`` as an overlayfs whose lower layer is the sandbox's
folder (``fs/``, the state at the last checkpoint plus what was merged since) and whose upper layer
(``overlay/upper/``) collects the step's writes across its several commands. bubblewrap 0.8 cannot mount an
overlay itself, so the command is started as ``unshare --user --map-root-user --mount`` + ``mount -a -T
overlay/fstab`` (both areas' unprivileged overlayfs mounts, ``userxattr,volatile``, in a user namespace of its own,
by one mount(8) run), which then execs bubblewrap as before; the mounts exist only in that command's namespace.

The upper layer then holds exactly what changed: new and modified files, whiteouts (0:0 character devices) for
deletions, and opaque folders (``user.overlay.opaque``) for replaced subtrees. `OverlayLayers.merge` moves it into
the lower layer by renames - O(changes) - and returns the changed paths (a `ChangeSet` for the snapshot engine);
what it replaces or deletes of the lower layer goes to the attempt's undo log (sandboxes/overlay_undo.py), so a
rollback renames the originals back instead of restoring from the store. `OverlayLayers.drop` throws the upper
layer away (one rename, deleted in the background): what a killed command left unmerged.

The upper layer is written by the sandbox, so it is hostile input: it is read by descriptor, never following a
symlink; names come from the directory itself (no ``/``, never ``..``); only a 0:0 character device is a whiteout
and only a folder's ``user.overlay.opaque`` makes it opaque; every ``user.overlay.*`` attribute is stripped from
what is merged (so the next mount never reads a stale marker); nothing leaves the sandbox's folder but originals
moved into the undo folder beside the upper layer, which no command binds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.overlay_undo import UndoLog, rename_node
from tardigrade.sandboxes.remove_tree import remove_folder
from tardigrade.sandboxes.safe_folders import DIR_FLAGS, lstat_at, remove_at

log = logging.getLogger(__name__)

#: The writable areas under ``fs/`` that a command sees through an overlay, each with its upper layer's name.
AREAS: tuple[tuple[str, str], ...] = (("workspace", "workspace"), ("home/sandbox", "home"))

_OVERLAY_XATTR = "user.overlay."
_OPAQUE = "user.overlay.opaque"
# mount(8) splits its -o string at "," and overlayfs its lowerdir at ":", and an fstab line its fields at blanks;
# a path holding one cannot be passed.
_UNSAFE_IN_OPTIONS = frozenset(",:\\\n\t =#")
# Mounts both overlays in the new namespace (one mount(8) run for all of them: each run costs milliseconds), then
# becomes bubblewrap (the same pid, so kills, --die-with-parent and bubblewrap's info fd behave as before). The
# fstab's path is a positional argument, never part of the script.
_MOUNT_SCRIPT = 'mount -a -T "$1" || exit 125; shift; exec "$@"'
# ``volatile``: no sync of the upper layer, ever (see `_clear_volatile_mark`).
_MOUNT_OPTIONS = "userxattr,volatile"


class OverlayError(Exception):
    """The overlay could not be mounted or merged; the caller falls back to walking."""


@dataclass(frozen=True)
class _Area:
    lower: Path  # fs/<area>: the state at the last checkpoint plus what was merged since
    upper: Path  # overlay/upper/<name>: this step's changes
    work: Path  # overlay/work/<name>: overlayfs's scratch folder, on the upper's filesystem
    view: Path  # overlay/view/<name>: where the overlay is mounted, inside the command's namespace only
    rel: str  # the area's path relative to fs/, as ChangeSet paths are


class OverlayLayers:
    """The overlay upper layers of one sandbox: mount arguments for its commands, merge, drop."""

    def __init__(self, sandbox_dir: Path, fs: Path) -> None:
        self.root = sandbox_dir / "overlay"
        self.areas = [
            _Area(fs / rel, self.root / "upper" / name, self.root / "work" / name, self.root / "view" / name, rel)
            for rel, name in AREAS
        ]
        self.undo = UndoLog(self.root, fs)
        self.fstab = self.root / "fstab"  # both areas' mounts, for one mount(8) run per command
        # Each upper folder's own mode when it was last made equal to its lower folder's: a command changed the
        # mounted folder's mode only if the upper's differs from this (never merely because the lower changed
        # since, as a rollback does, which a late merge of a killed command must not undo).
        self._matched: dict[str, int] = {}

    def prepare(self) -> None:
        for area in self.areas:
            for folder in (area.lower, area.upper, area.work, area.view):
                folder.mkdir(parents=True, exist_ok=True)
            self._same_mode(area)
        if not self.fstab.exists():  # the worker's own file, beside folders no command binds
            options = [f"lowerdir={a.lower},upperdir={a.upper},workdir={a.work},{_MOUNT_OPTIONS}" for a in self.areas]
            lines = [f"overlay {a.view} overlay {o} 0 0\n" for a, o in zip(self.areas, options, strict=True)]
            staged = self.fstab.with_name(f".fstab-{uuid.uuid4().hex[:12]}")
            staged.write_text("".join(lines))
            os.replace(staged, self.fstab)

    def view_of(self, lower: Path) -> Path:
        """The folder bubblewrap binds in place of ``lower`` (an area's folder under fs/)."""
        for area in self.areas:
            if area.lower == lower:
                return area.view
        raise KeyError(lower)

    def wrap(self, bwrap_argv: Sequence[str]) -> list[str]:
        """``bwrap_argv`` (which binds the views) started inside a user and mount namespace holding the overlays."""
        for area in self.areas:
            _clear_volatile_mark(area.work)
        argv = ["unshare", "--user", "--map-root-user", "--mount", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "overlay"]
        return [*argv, str(self.fstab), *bwrap_argv]

    def uppers(self) -> list[Path]:
        return [area.upper for area in self.areas]

    def has_changes(self) -> bool:
        for area in self.areas:
            with contextlib.suppress(FileNotFoundError), os.scandir(area.upper) as entries:
                if next(entries, None) is not None:
                    return True
        return False

    def _same_mode(self, area: _Area) -> None:
        """A fresh upper folder gets the lower one's mode: an overlay shows its root with the upper's."""
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(area.lower, follow_symlinks=False).st_mode)
            os.chmod(area.upper, mode)
            self._matched[area.rel] = mode

    def clean(self) -> bool:
        """Nothing of an attempt is here: no upper layer changes (not even a mode), no undo records."""
        if len(self.undo) or self.undo.written or self.has_changes():
            return False
        try:
            return all(os.stat(a.upper).st_mode == os.stat(a.lower, follow_symlinks=False).st_mode for a in self.areas)
        except FileNotFoundError:
            return False

    def merge(self) -> set[str]:
        """Move every upper layer into its lower layer; returns the changed paths relative to fs/. Raises
        `OverlayError` when the upper layer cannot be merged (what was merged stays merged: the view the commands
        see is the same either way)."""
        changes: set[str] = set()
        try:
            for area in self.areas:
                self._merge_area(area, changes)
        finally:
            self.undo.close()
        return changes

    def _merge_area(self, area: _Area, changes: set[str]) -> None:
        try:
            upper_fd = os.open(area.upper, DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            lower_fd = os.open(area.lower, DIR_FLAGS)
            try:
                # The mounted folder's own mode is the upper's (made equal to the lower's, see `_same_mode`).
                mode = stat.S_IMODE(os.fstat(upper_fd).st_mode)
                chmodded = mode != self._matched.get(area.rel) and mode != stat.S_IMODE(os.fstat(lower_fd).st_mode)
                if chmodded or os.listdir(upper_fd):
                    self.undo.note_folder(lower_fd, area.rel)
                _merge_folder(upper_fd, lower_fd, area.rel, changes, self.undo)
                if chmodded:
                    os.fchmod(lower_fd, mode)
                    self._matched[area.rel] = mode
                    changes.add(area.rel)
            finally:
                os.close(lower_fd)
        except Exception as e:  # OSError, RecursionError, the undo log's refusals: fs/ is no longer known
            self.undo.broken = True
            raise OverlayError(f"merging the overlay upper layer {area.upper} failed: {e}") from e
        finally:
            os.close(upper_fd)

    def drop(self) -> None:
        """Throw away every change in the upper layers: one rename now, the deletion in a background thread."""
        if not self.has_changes():  # nothing unmerged: renames nothing (a killed command may have left a chmod)
            for area in self.areas:
                self._same_mode(area)
            return
        upper = self.root / "upper"
        trash = self.root / f"trash-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(upper, trash)
            upper.mkdir()
            for area in self.areas:
                area.upper.mkdir()
                self._same_mode(area)
        except FileNotFoundError:
            return  # the sandbox's folder is gone: its owner reports the loss; nothing here recreates it
        threading.Thread(
            target=remove_folder, args=(trash, "the dropped overlay layer"), name="overlay-drop", daemon=True
        ).start()


def _clear_volatile_mark(work: Path) -> None:
    """Let the next mount reuse a work folder after a ``volatile`` one. A volatile overlay skips every sync of its
    upper layer (without it, each command's end synced the upper layer's whole filesystem: tens of ms under load),
    and marks its work folder (``work/incompat/volatile``) so that no later mount trusts an upper layer a crash may
    have cut short. Here nothing on this disk outlives a crash (a restarted worker deletes its predecessor's
    sandboxes, and a step's checkpoint is in the store), and the last mount ended with its command: its writes are
    in the page cache like any other, so the mark is cleared. The work folder is the worker's own: no command
    binds it."""
    inner = work / "work"
    try:
        os.chmod(inner, 0o700)  # overlayfs makes these folders mode 000
        os.chmod(inner / "incompat", 0o700)
    except FileNotFoundError:
        return  # no volatile mount yet
    volatile = inner / "incompat" / "volatile"
    with contextlib.suppress(FileNotFoundError):
        os.chmod(volatile, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(volatile / "dirty")
        os.rmdir(volatile)
    os.rmdir(inner / "incompat")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, _OPAQUE) in (b"y", b"x")
    except OSError:
        return False


def _strip_overlay_xattrs(fd: int) -> None:
    """Remove the overlay's own markers (opaque, origin, impure, redirect, whiteout...) from a merged node."""
    try:
        names = os.listxattr(fd)
    except OSError:
        return
    for name in names:
        if name.startswith(_OVERLAY_XATTR):
            with contextlib.suppress(OSError):
                os.removexattr(fd, name)


class _Level:
    """One folder of a descent that holds only the current folder open: a sandbox can nest folders deeper than
    Python's recursion limit and the worker's descriptor limit. Its own mode is opened up while its entries are
    worked on (a step may leave a folder read-only) and put back before the descent goes below it; climbing back
    opens ``..`` and checks it is the very folder that was left (device and inode)."""

    def __init__(self, fd: int, rel: str, names: list[str]) -> None:
        st = os.fstat(fd)
        self.id = (st.st_dev, st.st_ino)
        self.rel = rel
        self.names = names
        self.next = 0  # the index in ``names`` of the next entry to work on
        self.mode = stat.S_IMODE(st.st_mode)
        # The copied-up child folder being merged below: its name and the upper's stat of it, the lower's before.
        self.child: tuple[str, os.stat_result, os.stat_result] | None = None

    def open_up(self, fd: int) -> None:
        if self.mode & 0o700 != 0o700:
            os.fchmod(fd, self.mode | 0o700)

    def put_back(self, fd: int) -> None:
        if self.mode & 0o700 != 0o700:
            os.fchmod(fd, self.mode)


def _climb(fd: int, expected: tuple[int, int]) -> int:
    """The folder above ``fd``, which must be the one the descent came from (never another it was moved into)."""
    up = os.open("..", DIR_FLAGS, dir_fd=fd)
    st = os.fstat(up)
    if (st.st_dev, st.st_ino) != expected:
        os.close(up)
        raise OverlayError("a folder was moved while the merge was below it")
    return up


def _merge_folder(upper_fd: int, lower_fd: int, rel: str, changes: set[str], undo: UndoLog) -> None:
    """Merge one upper folder into its lower counterpart (both open by descriptor), then empty the upper one.
    Whatever of the lower layer it replaces or deletes goes to ``undo`` first. A copied-up folder (in both layers:
    something below it changed) is merged level by level without recursion, holding two descriptors beyond the
    caller's, however deep the sandbox nested it."""
    up, low = upper_fd, lower_fd
    stack: list[tuple[_Level, _Level]] = []  # the (upper, lower) folders above the current one
    here = (_Level(up, rel, sorted(os.listdir(up))), _Level(low, rel, []))
    try:
        while True:
            here[0].open_up(up)
            here[1].open_up(low)
            child = _merge_entries(up, low, here[0], changes, undo)
            if child is not None:  # a copied-up folder: go below, leaving this one as it was meanwhile
                name, st, child_up = child
                try:
                    child_low = os.open(name, DIR_FLAGS, dir_fd=low)
                except BaseException:
                    os.close(child_up)
                    raise
                path = f"{here[0].rel}/{name}"
                before = os.fstat(child_low)
                here[0].child = (name, st, before)
                try:
                    undo.note_folder(child_low, path)
                    here[0].put_back(up)
                    here[1].put_back(low)
                    below = (_Level(child_up, path, sorted(os.listdir(child_up))), _Level(child_low, path, []))
                except BaseException:
                    os.close(child_up)
                    os.close(child_low)
                    raise
                stack.append(here)
                if stack[1:]:  # the caller's own descriptors stay open for the climb back to them
                    os.close(up)
                    os.close(low)
                up, low, here = child_up, child_low, below
                continue
            here[0].put_back(up)
            here[1].put_back(low)
            if not stack:
                return
            parent = stack.pop()
            assert parent[0].child is not None
            name, st, before = parent[0].child
            parent[0].child = None
            # The copied-up folder's own metadata, now that its contents are merged.
            if stat.S_IMODE(before.st_mode) != stat.S_IMODE(st.st_mode):
                os.fchmod(low, stat.S_IMODE(st.st_mode))
                changes.add(here[0].rel)  # its own mode changed (listing it re-examines its subtree: rare, correct)
            os.utime(low, ns=(st.st_atime_ns, st.st_mtime_ns))
            if stack:
                new_up, new_low = _climb(up, parent[0].id), None
                try:
                    new_low = _climb(low, parent[1].id)
                finally:
                    if new_low is None:
                        os.close(new_up)
            else:
                new_up, new_low = upper_fd, lower_fd
            os.close(up)
            os.close(low)
            up, low, here = new_up, new_low, parent
            here[0].open_up(up)
            os.rmdir(name, dir_fd=up)
    except BaseException:
        with contextlib.suppress(OSError):
            here[0].put_back(up)
            here[1].put_back(low)
        if up != upper_fd:
            os.close(up)
            os.close(low)
        raise


def _merge_entries(
    upper_fd: int, lower_fd: int, level: _Level, changes: set[str], undo: UndoLog
) -> tuple[str, os.stat_result, int] | None:
    """Merge the upper folder's entries from ``level.next`` on, until one is a copied-up folder: then return its
    name, its upper stat and the upper folder opened (for the caller to merge below); None when all are merged."""
    while level.next < len(level.names):
        name = level.names[level.next]
        level.next += 1
        path = f"{level.rel}/{name}"
        st = lstat_at(upper_fd, name)
        if st is None:
            continue
        if _is_whiteout(st):  # a deletion: the name is gone from the merged view
            if lstat_at(lower_fd, name) is not None and not undo.set_aside(lower_fd, name, path):
                remove_at(lower_fd, name)
            os.unlink(name, dir_fd=upper_fd)
            changes.add(path)
            continue
        below = lstat_at(lower_fd, name)
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, DIR_FLAGS, dir_fd=upper_fd)
            try:
                if below is not None and stat.S_ISDIR(below.st_mode) and not _is_opaque(child):
                    return name, st, child
                # A folder replacing what was there (opaque, new, or over a non-folder): the whole subtree is
                # the upper's. Whiteouts inside hide nothing (there is no lower under them): they are removed.
                _scrub_subtree(child)
            except BaseException:
                os.close(child)
                raise
            os.close(child)
        elif not stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):  # a FIFO or socket opens with O_PATH only to read its xattrs
                node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=upper_fd)
                try:
                    _strip_overlay_xattrs_path(node)
                finally:
                    os.close(node)
        if below is None:
            undo.note_created(path)
        elif not undo.set_aside(lower_fd, name, path) and (stat.S_ISDIR(below.st_mode) or stat.S_ISDIR(st.st_mode)):
            remove_at(lower_fd, name)  # rename replaces a non-folder with a non-folder only
        rename_node(upper_fd, name, lower_fd, name, stat.S_ISDIR(st.st_mode))
        changes.add(path)
    return None


def _strip_overlay_xattrs_path(o_path_fd: int) -> None:
    # fgetxattr refuses O_PATH descriptors; /proc/self/fd/N names the very node without following a symlink.
    proc = f"/proc/self/fd/{o_path_fd}"
    try:
        names = os.listxattr(proc)
    except OSError:
        return
    for name in names:
        if name.startswith(_OVERLAY_XATTR):
            with contextlib.suppress(OSError):
                os.removexattr(proc, name)


def _scrub_subtree(fd: int) -> None:
    """Make a subtree that moves from the upper layer into the lower one plain: no whiteouts, no overlay xattrs.
    Level by level without recursion, holding one descriptor beyond the caller's, however deep it is nested."""
    cur = fd
    stack: list[_Level] = []  # the folders above the current one
    _strip_overlay_xattrs(cur)
    here = _Level(cur, "", os.listdir(cur))
    try:
        while True:
            here.open_up(cur)
            inner = None
            while inner is None and here.next < len(here.names):
                name = here.names[here.next]
                here.next += 1
                st = lstat_at(cur, name)
                if st is None:
                    continue
                if _is_whiteout(st):
                    os.unlink(name, dir_fd=cur)
                elif stat.S_ISDIR(st.st_mode):
                    inner = os.open(name, DIR_FLAGS, dir_fd=cur)
                elif not stat.S_ISLNK(st.st_mode):
                    with contextlib.suppress(OSError):
                        node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                        try:
                            _strip_overlay_xattrs_path(node)
                        finally:
                            os.close(node)
            if inner is not None:  # go below, leaving this folder as it was meanwhile
                try:
                    here.put_back(cur)
                    _strip_overlay_xattrs(inner)
                    below = _Level(inner, "", os.listdir(inner))
                except BaseException:
                    os.close(inner)
                    raise
                stack.append(here)
                if cur != fd:
                    os.close(cur)
                cur, here = inner, below
                continue
            here.put_back(cur)
            if not stack:
                return
            parent = stack.pop()
            up = _climb(cur, parent.id) if stack else fd
            os.close(cur)
            cur, here = up, parent
    except BaseException:
        with contextlib.suppress(OSError):
            here.put_back(cur)
        if cur != fd:
            os.close(cur)
        raise


def paths_usable(*paths: Path) -> bool:
    """Whether these paths can be passed in mount(8)'s option string."""
    return not any(set(str(p)) & _UNSAFE_IN_OPTIONS for p in paths)


@functools.cache
def probe(bwrap: str) -> str | None:
    """Try an overlay mount with bubblewrap inside, as a command would; None if it works, else why not (once per
    process: the kernel and the tools do not change under a running worker)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount (util-linux) is not installed"
    with tempfile.TemporaryDirectory(prefix="tardigrade-overlay-probe-") as tmp:
        layers = OverlayLayers(Path(tmp), Path(tmp) / "fs")
        if not paths_usable(layers.root, Path(tmp) / "fs"):
            return f"the temporary folder {tmp} holds a character mount options cannot carry"
        layers.prepare()
        (Path(tmp) / "fs" / "workspace" / "seen").write_text("lower\n")
        bwrap_argv = [
            bwrap, "--unshare-user", "--die-with-parent", "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            "--bind", str(layers.areas[0].view), "/workspace",
            "/bin/sh", "-c", "read x < /workspace/seen && rm /workspace/seen && echo x > /workspace/new",
        ]  # fmt: skip
        try:
            done = subprocess.run(layers.wrap(bwrap_argv), capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"starting it failed: {e}"
        if done.returncode != 0:
            return f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}"
        try:
            changes = layers.merge()
        except OverlayError as e:
            return str(e)
        if changes != {"workspace/seen", "workspace/new"}:
            return f"the upper layer did not record the probe's changes (saw {sorted(changes)})"
    return None
