"""What the bundled tools share: the workspace they are given, the files they look at, and
the digest that proves a read-only scan left a workspace alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forgespace.workflows._tools.common import (
    iter_files,
    relative_name,
    tree_digest,
    workspace_root,
)


def test_a_missing_workspace_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"workspace '{tmp_path / 'gone'}' does not exist"):
        workspace_root(tmp_path / "gone")
    assert workspace_root(tmp_path) == tmp_path


def test_a_single_file_target_is_its_only_file_under_its_own_name(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("print('hi')\n")
    assert list(iter_files(target)) == [target]
    assert relative_name(target, target) == "target"


def test_only_regular_files_are_walked_and_links_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the target's\n")
    ws = tmp_path / "ws"
    (ws / "b").mkdir(parents=True)
    (ws / ".git").mkdir()
    (ws / ".git" / "config").write_text("[core]\n")
    (ws / "b" / "z.py").write_text("z\n")
    (ws / "a.py").write_text("a\n")
    (ws / "link-to-file").symlink_to(outside / "secret.txt")
    (ws / "link-to-dir").symlink_to(outside)
    os.mkfifo(ws / "pipe")
    files = [relative_name(ws, p) for p in iter_files(ws)]
    assert files == ["a.py", "b/z.py"]


def test_the_digest_sees_where_a_link_points(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    (ws / "b.txt").write_text("b\n")
    (ws / "current").symlink_to("a.txt")
    # Same name length, same times: only the link's target tells the two trees apart.
    os.utime(ws / "current", ns=(0, 0), follow_symlinks=False)
    before = tree_digest(ws)
    assert tree_digest(ws) == before  # nothing changed, same digest
    (ws / "current").unlink()
    (ws / "current").symlink_to("b.txt")
    os.utime(ws / "current", ns=(0, 0), follow_symlinks=False)
    assert tree_digest(ws) != before
    single = ws / "a.txt"
    assert tree_digest(single) == tree_digest(single)
    digest = tree_digest(single)
    single.write_text("A\n")
    assert tree_digest(single) != digest
