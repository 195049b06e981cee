"""ENOSPC during download or extraction: CacheFullError naming the path and sizes, the
partial entry removed, and the cache exactly as it was (on a small tmpfs the test mounts)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import make_project, tree_digest

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import CacheFullError

pytestmark = pytest.mark.integration

FS_BYTES = 8 * 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _state(cache: WorkspaceCache) -> tuple[set[str], list[str], int]:
    root = cache.layout.root
    files = {str(p.relative_to(root)) for p in root.rglob("*") if ".forgespace" not in p.parts}
    keys = sorted(e.key for e in cache.index.entries())
    return files, keys, len(os.listdir(cache.layout.tmp_dir))


@pytest.mark.parametrize("mode", ["shared", "copy-on-write", "isolated"])
def test_enospc_during_extraction(small_fs: Path, tmp_path: Path, mode: str) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(small_fs / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    cache = WorkspaceCache(settings)
    small = make_project(tmp_path / "proj", files=10)
    small_id = cache.store.upload_target(small)
    served = cache.get_target(small_id, None, "shared")
    # 16 MiB of zeros: a tiny object that does not fit once extracted
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    for i in range(16):
        (bomb / f"zeros{i}.bin").write_bytes(bytes(2**20))
    bomb_id = cache.store.upload_target(bomb)
    assert cache.store.stat_target(bomb_id).size < 1_000_000
    before = _state(cache)
    free_before = os.statvfs(small_fs).f_bavail

    with pytest.raises(CacheFullError) as ei:
        cache.get_target(bomb_id, "r1", mode)
    msg = str(ei.value)
    assert "no space left" in msg and str(cache.layout.root) in msg and "bytes" in msg
    assert isinstance(ei.value, OSError)

    assert _state(cache) == before
    # the partial 8 MiB is gone; only bookkeeping (lock file, index WAL) may have grown
    assert os.statvfs(small_fs).f_bavail == pytest.approx(free_before, abs=64)
    assert {lease.lease_id for lease in cache.index.live_leases()} == set()
    hit = cache.get_target_report(small_id, None, "shared")
    assert hit.path == served and not hit.downloaded
    assert tree_digest(Path(served)) == tree_digest(small)


def test_enospc_during_download(small_fs: Path, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(small_fs / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    cache = WorkspaceCache(settings)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(FS_BYTES + 2**20))  # incompressible, larger than the fs
    big_id = cache.store.upload_target(big)
    before = _state(cache)
    with pytest.raises(CacheFullError) as ei:
        cache.get_target(big_id, None, "shared")
    assert str(FS_BYTES + 2**20) in str(ei.value)
    assert _state(cache) == before
    assert os.listdir(cache.layout.tmp_dir) == []


def test_enospc_while_copying_a_run_for_copy_on_write(small_fs: Path, tmp_path: Path) -> None:
    """The shared copy fits (5 MiB of 8), the run's copy does not (tmpfs has no reflinks):
    CacheFullError, the run's partial copy removed, the shared copy kept for the next run."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(small_fs / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    cache = WorkspaceCache(settings)
    proj = tmp_path / "five"
    proj.mkdir()
    for i in range(5):
        (proj / f"zeros{i}.bin").write_bytes(bytes(2**20))
    tid = cache.store.upload_target(proj)
    with pytest.raises(CacheFullError) as ei:
        cache.get_target(tid, "r1", "copy-on-write")
    assert "no space left" in str(ei.value) and str(cache.layout.root) in str(ei.value)
    shared = cache.layout.cow_shared_workspace(tid)
    assert tree_digest(shared) == tree_digest(proj)  # published before the copy failed
    assert not (settings.cache_dir / tid / "r1").exists()
    assert os.listdir(cache.layout.tmp_dir) == []
    assert [e.key for e in cache.index.entries()] == [f"{tid}/shared"]
    assert cache.index.live_leases() == []
