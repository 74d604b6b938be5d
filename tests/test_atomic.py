"""atomic: a file written or copied appears whole, with the permissions a plain write or copy gives
it, and a failure leaves the old file and no temporary behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trtllm_deploy import atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.rglob("*") if ".part-" in path.name]


def _source_file(tmp_path: Path) -> Path:
    source = tmp_path / "source.txt"
    source.write_text("copied\n")
    source.chmod(0o751)
    return source


def _source_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("in the tree\n")
    (tree / "link").symlink_to("sub/file")
    return tree


@pytest.mark.parametrize("before, write, content, mode", [
    (None, lambda dest, tmp: atomic.write_text(dest, "new ✓\n"), "new ✓\n", None),
    ("old\n", lambda dest, tmp: atomic.write_text(dest, "new\n"), "new\n", None),
    (None, lambda dest, tmp: atomic.write_bytes(dest, b"\x00\x01"), "\x00\x01", None),
    ("old\n", lambda dest, tmp: atomic.write_text(dest, "secret\n", mode=0o600), "secret\n", 0o600),
    (None, lambda dest, tmp: atomic.copy(_source_file(tmp), dest), "copied\n", 0o751),
    ("old\n", lambda dest, tmp: atomic.copy(_source_file(tmp), dest), "copied\n", 0o751),
], ids=["new-file", "over-a-file", "bytes", "with-mode", "copy-new", "copy-over"])
def test_a_file_is_replaced_whole(tmp_path, before, write, content, mode):
    dest = tmp_path / "folder" / "made" / "dest"
    if before is not None:
        dest.parent.mkdir(parents=True)
        dest.write_text(before)
    write(dest, tmp_path)
    assert dest.read_bytes() == content.encode()
    assert _mode(dest) == (0o666 & ~_umask() if mode is None else mode)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("before", [None, "file", "tree"], ids=["new", "over-a-file", "over-a-tree"])
def test_a_tree_is_copied_whole_with_its_symlinks(tmp_path, before):
    source = _source_tree(tmp_path)
    dest = tmp_path / "dest"
    if before == "file":
        dest.write_text("old\n")
    elif before == "tree":
        (dest / "stale").mkdir(parents=True)
    atomic.copy(source, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["link", "sub", "sub/file"]
    assert (dest / "link").is_symlink() and os.readlink(dest / "link") == "sub/file"
    assert (dest / "sub" / "file").read_text() == "in the tree\n"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fill", [
    lambda temporary: temporary.write_text("half"),
    lambda temporary: temporary.mkdir(),
    lambda temporary: temporary.symlink_to("nowhere"),
    lambda temporary: None,
], ids=["a-file", "a-folder", "a-symlink", "nothing"])
def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, fill):
    dest = tmp_path / "dest"
    dest.write_text("old\n")
    with pytest.raises(RuntimeError), atomic.replacing(dest) as temporary:
        fill(temporary)
        raise RuntimeError("the writer failed")
    assert dest.read_text() == "old\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dest"]


def test_each_write_has_its_own_temporary(tmp_path):
    dest = tmp_path / "dest"
    with atomic.replacing(dest) as first, atomic.replacing(dest) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first\n")
        second.write_text("second\n")
    assert dest.read_text() == "first\n"  # the outer block ends last
