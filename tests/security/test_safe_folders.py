"""The one symlink-safe folder implementation (sandboxes/safe_folders.py), on its own: what every user of it
(snapshot restore, remote mirror, local file tools, mount refresh) relies on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tardigrade.sandboxes.errors import UnsafePath
from tardigrade.sandboxes.safe_folders import SafeFolders, is_safe_relative, remove_at, walk_bottom_up


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root with a folder, a file, and symlinks out of it to an ``outside`` folder holding one file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("inside")
    outside.mkdir()
    (outside / "precious").write_text("outside")
    (root / "out").symlink_to(outside)
    (root / "dir" / "out-file").symlink_to(outside / "precious")
    return root, outside


@pytest.mark.parametrize("path", ["", "/etc/passwd", "a//b", "./a", "a/./b", "a/..", "../x", "a/../../x", "a\0b"])
def test_paths_that_could_leave_the_root_are_refused_before_use(tree: tuple[Path, Path], path: str) -> None:
    root, outside = tree
    assert not is_safe_relative(path)
    with SafeFolders(root) as folders, pytest.raises(UnsafePath):
        folders.write_file(path + "/new" if path else path, b"x", mode=0o644)
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_nothing_is_created_written_or_read_through_a_symlink(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with SafeFolders(root) as folders:
        for call in (
            lambda: folders.write_file("out/new/file", b"x", mode=0o644),
            lambda: folders.make_dirs("out/new"),
            lambda: folders.read_file("out/precious", limit=None),
            lambda: folders.read_file("dir/out-file", limit=None),
            lambda: folders.write_file("dir/out-file", b"x", mode=0o644),
        ):
            with pytest.raises(UnsafePath, match="symlink"):
                call()
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_text() == "outside"


def test_replace_symlinks_swaps_a_planted_link_for_a_real_folder(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with SafeFolders(root) as folders:
        parent, name = folders.parent_of("out/file", create=True, replace_symlinks=True)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=parent)
        os.close(fd)
    assert (root / "out").is_dir() and not (root / "out").is_symlink() and (root / "out" / "file").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_removing_a_tree_removes_links_not_their_targets(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "dir" / "ro").mkdir()
    (root / "dir" / "ro" / "f").write_text("x")
    os.chmod(root / "dir" / "ro", 0o500)  # a step may leave folders read-only
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_at(fd, "out")
        remove_at(fd, "dir")
        remove_at(fd, "missing")
    finally:
        os.close(fd)
    assert list(root.iterdir()) == []
    assert (outside / "precious").read_text() == "outside"


def test_the_walk_reports_symlinks_and_never_enters_them(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    seen = {path: stat.S_IFMT(st.st_mode) for path, _, _, st in walk_bottom_up(root)}
    assert seen == {
        "dir/file": stat.S_IFREG, "dir/out-file": stat.S_IFLNK, "dir": stat.S_IFDIR, "out": stat.S_IFLNK,
    }  # fmt: skip
    order = [path for path, *_ in walk_bottom_up(root)]
    assert order.index("dir/file") < order.index("dir"), "a folder's contents come before the folder"


def test_only_regular_files_are_opened(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.mkfifo(root / "pipe")
    with SafeFolders(root) as folders:
        with pytest.raises(UnsafePath, match="FIFO"):
            folders.read_file("pipe", limit=10)
        with pytest.raises(UnsafePath, match="FIFO"):
            folders.write_file("pipe", b"x", mode=0o644)
        with pytest.raises(IsADirectoryError):
            folders.read_file("dir", limit=10)
        with pytest.raises(FileNotFoundError):
            folders.read_file("dir/missing", limit=10)
        folders.write_file("dir/file", b"new", mode=0o600)
        assert folders.read_file("dir/file", limit=None) == b"new"
        assert folders.read_file("dir/file", limit=2) == b"ne"
    assert stat.S_IMODE(os.stat(root / "dir" / "file").st_mode) == 0o600


def test_removing_a_tree_deeper_than_the_recursion_and_descriptor_limits(tmp_path: Path) -> None:
    """A sandbox can nest folders 1,500 deep (``mkdir a; cd a`` in a loop): a restore must still delete it, with
    two descriptors open, not one per level, and leave its neighbours alone."""
    import resource

    root = tmp_path / "root"
    root.mkdir()
    (root / "keep").write_text("neighbour")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=fd)
    level = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    for i in range(1500):  # by descriptor: the path is longer than PATH_MAX
        os.mkdir("a", dir_fd=level)
        if i % 100 == 0:
            os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=level))
            os.symlink(str(tmp_path), "link", dir_fd=level)
        inner = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
        os.close(level)
        level = inner
    os.chmod(level, 0o500)  # a read-only folder at the bottom
    os.close(level)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1024), hard))
    try:
        remove_at(fd, "deep")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert sorted(p.name for p in root.iterdir()) == ["keep"]
    assert (root / "keep").read_text() == "neighbour" and tmp_path.is_dir()


def test_removing_a_tree_stops_if_a_folder_is_moved_out_from_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Climbing back up through ``..`` must land where the walk came from: if a live command moved the folder being
    emptied elsewhere, the delete stops with an error instead of emptying whatever ``..`` now is."""
    import tardigrade.sandboxes.safe_folders as sf

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "t" / "a" / "b").mkdir(parents=True)
    (root / "t" / "a" / "b" / "f").write_text("x")
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    real_listdir = os.listdir
    moved = []

    def listdir_then_move(fd: int) -> list[str]:  # the command moves ``a/b`` away while the walk is inside it
        names = real_listdir(fd)
        if not moved and "f" in names:
            os.rename(root / "t" / "a" / "b", elsewhere / "b")
            moved.append(True)
        return names

    monkeypatch.setattr(sf.os, "listdir", listdir_then_move)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="moved"):
            remove_at(fd, "t")
    finally:
        os.close(fd)
    assert (elsewhere / "precious").read_text() == "keep me"
