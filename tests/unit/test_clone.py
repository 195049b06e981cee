"""materialize_copy keeps contents, modes, symlinks, hard links and mtimes; reflinks on btrfs
share extents with the source; make_read_only locks a tree."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from support.trees import make_read_only

from forgespace.cache import clone as clone_mod
from forgespace.cache.clone import materialize_copy
from forgespace.errors import CacheFullError

MTIME_NS = 1_600_000_000_123_456_789


def make_tree(root: Path) -> Path:
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/data.bin").write_bytes(os.urandom(300_000))
    (root / "a/text.txt").write_text("hello\n" * 1000)
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "tool.sh").chmod(0o755)
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    os.symlink("a/text.txt", root / "link")
    os.symlink("../tool.sh", root / "a/up")
    os.symlink("does-not-exist", root / "dangling")
    os.link(root / "a/text.txt", root / "a/hard")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(Path(dirpath, n), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    return root


def snapshot(root: Path, *, modes: bool = True) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            rel = str(p.relative_to(root))
            mode = stat.S_IMODE(st.st_mode) if modes else 0
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_mtime_ns)
            else:
                out[rel] = ("file", p.read_bytes(), mode, st.st_mtime_ns)
    return out


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = make_tree(tmp_path / "src")
    make_read_only(src)
    return src


def test_read_only_copy_is_identical(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst"
    stats = materialize_copy(source, dst, writable=False)
    assert snapshot(dst) == snapshot(source)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o555
    assert stats.files == 5  # data.bin, text.txt, its hard link, tool.sh, empty
    assert stats.method in ("reflink", "copy_file_range", "copy")


@pytest.mark.parametrize("workers", [1, 3])
def test_writable_copy_adds_owner_write_and_keeps_the_rest(
    tmp_path: Path, source: Path, workers: int
) -> None:
    dst = tmp_path / "dst"
    stats = materialize_copy(source, dst, workers=workers)
    src_snap, dst_snap = snapshot(source), snapshot(dst)
    assert src_snap.keys() == dst_snap.keys()
    for rel, s in src_snap.items():
        d = dst_snap[rel]
        if s[0] == "file":
            assert d == ("file", s[1], s[2] | 0o200, s[3]), rel  # type: ignore[operator]
        elif s[0] == "dir":
            assert d == ("dir", s[1] | 0o700, s[2]), rel  # type: ignore[operator]
        else:
            assert d == s, rel
    assert stat.S_IMODE((dst / "tool.sh").stat().st_mode) == 0o755
    assert os.readlink(dst / "a/up") == "../tool.sh"
    assert (dst / "dangling").is_symlink()
    assert (dst / "a/hard").stat().st_ino == (dst / "a/text.txt").stat().st_ino
    assert stats.bytes == sum(
        (source / r).stat().st_size for r in ("a/b/data.bin", "a/text.txt", "tool.sh")
    )
    # Writing the copy leaves the source alone.
    (dst / "a/text.txt").write_text("changed")
    (dst / "new").write_text("new")
    assert (source / "a/text.txt").read_text() == "hello\n" * 1000
    assert not (source / "new").exists()


def test_copy_method_on_this_filesystem(tmp_path: Path, source: Path) -> None:
    stats = materialize_copy(source, tmp_path / "dst")
    # ext4/tmpfs refuse FICLONE; copy_file_range works on every local Linux filesystem.
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True
    ).stdout.strip()
    if fstype in ("btrfs", "xfs"):
        assert stats.method == "reflink"
    else:
        assert stats.method == "copy_file_range", fstype


def test_existing_destination_is_refused(tmp_path: Path, source: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(FileExistsError):
        materialize_copy(source, dst)


def test_full_disk_raises_cache_full_and_leaves_nothing(tmp_path: Path, small_tmpfs: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(512 * 1024))  # 4 MiB into a 2 MiB filesystem
    dst = small_tmpfs / "dst"
    with pytest.raises(CacheFullError, match="no space left"):
        materialize_copy(src, dst)
    assert os.listdir(small_tmpfs) == []


def test_io_error_mid_copy_leaves_nothing(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = os.copy_file_range

    def flaky(src: int, dst: int, count: int, *a: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, "injected I/O error")
        return real(src, dst, count)

    monkeypatch.setattr(clone_mod, "FICLONE", 0)  # make the reflink attempt fail everywhere
    monkeypatch.setattr(os, "copy_file_range", flaky)
    dst = tmp_path / "dst"
    with pytest.raises(OSError, match="injected"):
        materialize_copy(source, dst)
    assert calls["n"] >= 3
    assert not dst.exists()


def test_make_read_only(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    make_read_only(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            assert stat.S_IMODE(Path(dirpath, n).stat().st_mode) == 0o555
        for n in filenames:
            p = Path(dirpath, n)
            if p.is_symlink():
                continue
            want = 0o555 if n == "tool.sh" else 0o444
            assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE(root.stat().st_mode) == 0o555


def _shared_extent_bytes(path: Path) -> int:
    """Bytes of ``path`` whose extents filefrag reports as shared."""
    out = subprocess.run(
        ["filefrag", "-v", "-b1", str(path)], capture_output=True, text=True, check=True
    ).stdout
    shared = 0
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].rstrip(":").isdigit() and "shared" in line:
            # "ext: logical_offset: physical_offset: length: expected: flags"
            length = line.split(":")[3].strip().split()[0]
            shared += int(length)
    return shared


@pytest.mark.btrfs
def test_reflink_on_btrfs_shares_extents(btrfs_dir: Path) -> None:
    src = btrfs_dir / "reflink-src"
    src.mkdir()
    size = 64 << 20
    with open(src / "big.bin", "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    (src / "small.txt").write_text("small")
    os.sync()
    free_before = os.statvfs(btrfs_dir)
    dst = btrfs_dir / "reflink-dst"
    stats = materialize_copy(src, dst)
    os.sync()
    free_after = os.statvfs(btrfs_dir)

    assert stats.method == "reflink"
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert _shared_extent_bytes(dst / "big.bin") >= size * 0.99
    dropped = (free_before.f_bavail - free_after.f_bavail) * free_before.f_frsize
    assert dropped < size // 8, f"free space dropped by {dropped} bytes for a {size}-byte clone"

    # Writing the clone un-shares only what is written; the source keeps its bytes.
    original = (src / "big.bin").read_bytes()[:4096]
    with open(dst / "big.bin", "r+b") as f:
        f.write(b"\0" * 4096)
    assert (src / "big.bin").read_bytes()[:4096] == original
    assert (dst / "big.bin").read_bytes()[:4096] == b"\0" * 4096
