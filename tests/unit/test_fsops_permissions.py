"""The permission fallbacks an unprivileged worker needs (root bypasses every check below, so
these run in the non-root lane, ``make test-nonroot``; as root they skip with that reason).

- Moving a read-only directory to another parent needs u+w on it (its '..' entry changes):
  ``fsops.rename_into`` (every shared publish of an archive with read-only directories)
  and ``fsops.discard`` (into the trash) add it for the move.
- Removing a tree with read-only (0555) and unreadable (000) directories needs u+rwx on each
  before it can be listed and emptied: ``fsops.remove_at``.

Each test first shows the plain operation failing for this user, so it cannot pass for a
reason that has nothing to do with the fallback.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from support.procs import make_project

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache import fsops

pytestmark = pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root bypasses directory permissions: `make test-nonroot` runs these as uid 65534",
)


def _read_only_tree(base: Path) -> Path:
    """base/ro (0555) holding sub (0555) with a file, and locked (000) with a file."""
    ro = base / "ro"
    (ro / "sub").mkdir(parents=True)
    (ro / "sub" / "f").write_text("x")
    (ro / "locked").mkdir()
    (ro / "locked" / "g").write_text("y")
    os.chmod(ro / "locked", 0)
    os.chmod(ro / "sub", 0o555)
    os.chmod(ro, 0o555)
    return ro


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_renaming_a_read_only_directory_to_another_parent(tmp_path: Path) -> None:
    root = tmp_path
    (root / "a").mkdir()
    (root / "b").mkdir()
    probe = root / "a" / "probe"
    probe.mkdir(mode=0o555)
    os.chmod(probe, 0o555)
    with pytest.raises(PermissionError):  # what the fallback is for
        os.rename(probe, root / "b" / "probe")

    src = _read_only_tree(root / "a")
    fsops.rename_into(root, src, root / "b" / "ro")
    moved = root / "b" / "ro"
    assert not src.exists() and moved.is_dir()
    assert _mode(moved) == 0o555  # its mode back after the move
    assert (moved / "sub" / "f").read_text() == "x"

    os.chmod(moved, 0o555)
    fsops.rename_into(root, moved, root / "a" / "kept", keep_mode=False)
    assert _mode(root / "a" / "kept") & 0o700 == 0o700  # left writable when asked


def test_removing_read_only_and_mode_000_trees(tmp_path: Path) -> None:
    probe = _read_only_tree(tmp_path / "probe")
    with pytest.raises(PermissionError):
        shutil.rmtree(probe)
    tree = _read_only_tree(tmp_path / "t")
    fd = os.open(tmp_path / "t", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsops.remove_at(fd, "ro")
    finally:
        os.close(fd)
    assert not tree.exists()
    assert os.listdir(tmp_path / "t") == []


def test_discarding_a_read_only_tree_goes_through_the_trash(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".forgespace").mkdir(parents=True)
    tree = _read_only_tree(root / "tid")
    fsops.discard(root, tree)
    assert not tree.exists()
    assert os.listdir(root / ".forgespace" / "trash") == []


def test_shared_publish_and_eviction_of_an_archive_with_read_only_directories(
    tmp_path: Path,
) -> None:
    """The whole path a non-root worker takes: an uploaded tree whose directories are
    read-only is published (rename of the extracted workspace into place), then evicted."""
    project = make_project(tmp_path / "src")
    (project / "ro").mkdir()
    (project / "ro" / "f").write_text("z")
    os.chmod(project / "ro", 0o555)
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    tid = open_store(settings).upload_target(project)
    os.chmod(project / "ro", 0o755)
    cache = WorkspaceCache(settings)
    for mode, run in (("shared", None), ("copy-on-write", "r1"), ("isolated", "r2")):
        ws = Path(cache.get_target(tid, run, workspace_isolation=mode))
        if mode == "shared":  # published read-only: moved into place through the fallback
            assert _mode(ws) == 0o555 and _mode(ws / "ro") == 0o555
        assert (ws / "ro" / "f").read_text() == "z"
        cache.cleanup_cache(str(ws), workspace_isolation=mode)
    report = WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    assert report.evicted, report
    assert not (settings.cache_dir / tid).exists()
