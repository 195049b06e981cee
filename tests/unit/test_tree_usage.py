"""storage.pack.tree_usage / tree_size: the one walk that sizes a tree (packing progress,
cache rebuild and gc alike)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from forgespace.storage.pack import tree_size, tree_usage


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"x" * 10)
    (root / "sub" / "b").write_bytes(b"y" * 5)
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 1000)
    os.symlink(outside, root / "link-dir")
    os.symlink(outside / "big", root / "link-file")


def test_counts_regular_files_and_follows_no_symlink_inside(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    assert tree_usage(tmp_path / "t") == (15, 2)
    assert tree_size(tmp_path / "t") == 15


def test_a_file_a_symlink_and_a_missing_path(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    assert tree_usage(tmp_path / "t" / "a") == (10, 1)
    assert tree_usage(tmp_path / "t" / "link-dir") == (0, 0)
    assert tree_usage(tmp_path / "nothing") == (0, 0)


def test_tree_size_follows_a_symlinked_root(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    os.symlink(tmp_path / "t", tmp_path / "alias")
    assert tree_size(tmp_path / "alias") == 15


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_one_filesystem_does_not_enter_a_mount_point(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    mnt = tmp_path / "t" / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "inside").write_bytes(b"m" * 100)
        assert tree_usage(tmp_path / "t", one_filesystem=True) == (15, 2)
        assert tree_usage(tmp_path / "t") == (115, 3)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
