"""Overlay upper layers for the local sandbox: know what a step changed without walking, drop a failed attempt in O(1).

Each bubblewrap command sees ``/workspace`` and ``/home/sandbox`` as an overlayfs whose lower layer is the sandbox's
folder (``fs/``, the state at the last checkpoint plus what was merged since) and whose upper layer
(``overlay/upper/``) collects the step's writes across its several commands. bubblewrap 0.8 cannot mount an
overlay itself, so the command is started as ``unshare --user --map-root-user --mount`` + ``mount -t overlay
-o userxattr`` (unprivileged overlayfs in a user namespace of its own), which then execs bubblewrap as before; the
mount exists only in that command's mount namespace.

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

from tardigrade.sandboxes.overlay_undo import UndoLog, rename_node, writable
from tardigrade.sandboxes.remove_tree import remove_tree
from tardigrade.sandboxes.safe_folders import DIR_FLAGS, remove_at

log = logging.getLogger(__name__)

#: The writable areas under ``fs/`` that a command sees through an overlay, each with its upper layer's name.
AREAS: tuple[tuple[str, str], ...] = (("workspace", "workspace"), ("home/sandbox", "home"))

_OVERLAY_XATTR = "user.overlay."
_OPAQUE = "user.overlay.opaque"
# mount(8) splits its -o string at "," and overlayfs its lowerdir at ":"; a path holding one cannot be passed.
_UNSAFE_IN_OPTIONS = frozenset(",:\\\n\t =")
# Mounts both overlays in the new namespace, then becomes bubblewrap (the same pid, so kills, --die-with-parent
# and bubblewrap's info fd behave as before). Paths are positional arguments, never part of the script.
_MOUNT_SCRIPT = (
    'while [ "$1" != -- ]; do '
    'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3,userxattr" "$4" || exit 125; shift 4; '
    'done; shift; exec "$@"'
)


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
        # Each upper folder's own mode when it was last made equal to its lower folder's: a command changed the
        # mounted folder's mode only if the upper's differs from this (never merely because the lower changed
        # since, as a rollback does, which a late merge of a killed command must not undo).
        self._matched: dict[str, int] = {}

    def prepare(self) -> None:
        for area in self.areas:
            for folder in (area.lower, area.upper, area.work, area.view):
                folder.mkdir(parents=True, exist_ok=True)
            self._same_mode(area)

    def view_of(self, lower: Path) -> Path:
        """The folder bubblewrap binds in place of ``lower`` (an area's folder under fs/)."""
        for area in self.areas:
            if area.lower == lower:
                return area.view
        raise KeyError(lower)

    def wrap(self, bwrap_argv: Sequence[str]) -> list[str]:
        """``bwrap_argv`` (which binds the views) started inside a user and mount namespace holding the overlays."""
        argv = ["unshare", "--user", "--map-root-user", "--mount", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "overlay"]
        for area in self.areas:
            argv += [str(area.lower), str(area.upper), str(area.work), str(area.view)]
        return [*argv, "--", *bwrap_argv]

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
        threading.Thread(target=_remove_folder, args=(trash,), name="overlay-drop", daemon=True).start()


def _remove_folder(path: Path) -> None:
    try:
        parent = os.open(path.parent, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        remove_tree(parent, path.name)  # however deep the sandbox nested it
    except OSError:
        log.warning("could not delete the dropped overlay layer %s", path, exc_info=True)
    finally:
        os.close(parent)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


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


def _merge_folder(upper_fd: int, lower_fd: int, rel: str, changes: set[str], undo: UndoLog) -> None:
    """Merge one upper folder into its lower counterpart (both open by descriptor), then empty the upper one.
    Whatever of the lower layer it replaces or deletes goes to ``undo`` first."""
    with writable(upper_fd), writable(lower_fd):
        for name in sorted(os.listdir(upper_fd)):
            path = f"{rel}/{name}"
            st = _lstat(upper_fd, name)
            if st is None:
                continue
            if _is_whiteout(st):  # a deletion: the name is gone from the merged view
                if _lstat(lower_fd, name) is not None and not undo.set_aside(lower_fd, name, path):
                    remove_at(lower_fd, name)
                os.unlink(name, dir_fd=upper_fd)
                changes.add(path)
                continue
            below = _lstat(lower_fd, name)
            if stat.S_ISDIR(st.st_mode):
                child = os.open(name, DIR_FLAGS, dir_fd=upper_fd)
                try:
                    if below is not None and stat.S_ISDIR(below.st_mode) and not _is_opaque(child):
                        _merge_into_existing(child, lower_fd, name, path, st, changes, undo)
                        os.rmdir(name, dir_fd=upper_fd)
                        continue
                    # A folder replacing what was there (opaque, new, or over a non-folder): the whole subtree is
                    # the upper's. Whiteouts inside hide nothing (there is no lower under them): they are removed.
                    _scrub_subtree(child)
                finally:
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


def _merge_into_existing(
    child_upper: int, lower_fd: int, name: str, path: str, st: os.stat_result, changes: set[str], undo: UndoLog
) -> None:
    """A folder that was copied up (something below it changed): merge its contents, then its own metadata."""
    child_lower = os.open(name, DIR_FLAGS, dir_fd=lower_fd)
    try:
        before = os.fstat(child_lower)
        undo.note_folder(child_lower, path)
        _merge_folder(child_upper, child_lower, path, changes, undo)
        if stat.S_IMODE(before.st_mode) != stat.S_IMODE(st.st_mode):
            os.fchmod(child_lower, stat.S_IMODE(st.st_mode))
            changes.add(path)  # its own mode changed (listing it re-examines its subtree: rare, and correct)
        os.utime(child_lower, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(child_lower)


def _scrub_subtree(fd: int) -> None:
    """Make a subtree that moves from the upper layer into the lower one plain: no whiteouts, no overlay xattrs."""
    _strip_overlay_xattrs(fd)
    with writable(fd):
        for name in os.listdir(fd):
            st = _lstat(fd, name)
            if st is None:
                continue
            if _is_whiteout(st):
                os.unlink(name, dir_fd=fd)
            elif stat.S_ISDIR(st.st_mode):
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    _scrub_subtree(child)
                finally:
                    os.close(child)
            elif not stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        _strip_overlay_xattrs_path(node)
                    finally:
                        os.close(node)


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
