"""Filesystems made by the tests: a btrfs filesystem in a sparse file, loop-mounted.

``btrfs_dir`` (session fixture) is a directory on that mount. Where it cannot be made (no
mkfs.btrfs, not root, the kernel refuses the loop mount) the tests that need it are skipped with
the exact reason. ``loop_fs`` / ``loop_btrfs`` do the same as context managers (the benchmarks
use them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

_TIMEOUT = 60
#: Set to 1 (CI's root lane does) to fail, not skip, the tests needing a btrfs loop mount.
REQUIRE_MOUNTS = "FORGESPACE_TEST_REQUIRE_MOUNTS"


class MountRefused(Exception):
    """The filesystem could not be created or mounted here; the message says why."""


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise MountRefused(f"`{' '.join(cmd)}` did not finish within {_TIMEOUT} s") from e
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip()
        raise MountRefused(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {msg}")


def _umount(mnt: Path) -> None:
    try:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        r = None
    if r is None or r.returncode != 0:
        # Something still holds the mount (a leaked fd): detach it lazily so the run ends.
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=_TIMEOUT)


@contextlib.contextmanager
def loop_fs(workdir: Path, fstype: str = "btrfs", *, size: int = 2 << 30) -> Iterator[Path]:
    """Create a sparse ``size``-byte image in ``workdir``, format it (``btrfs`` or ``ext4``),
    loop-mount it and yield the mount point; unmount and delete everything on exit.
    Raises MountRefused with the reason where that cannot be done."""
    mkfs = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F"]}[fstype]
    if shutil.which(mkfs[0]) is None:
        raise MountRefused(
            f"{mkfs[0]} not found (install {'btrfs-progs' if fstype == 'btrfs' else 'e2fsprogs'})"
        )
    if os.geteuid() != 0:
        raise MountRefused("loop-mounting a filesystem needs root")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"{fstype}.img"
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    mounted = False
    try:
        _run([*mkfs, str(image)])
        _run(["mount", "-o", "loop", str(image), str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted:
            _umount(mnt)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()
            if created:
                workdir.rmdir()


def loop_btrfs(workdir: Path, *, size: int = 2 << 30) -> contextlib.AbstractContextManager[Path]:
    """:func:`loop_fs` with btrfs (reflink-capable)."""
    return loop_fs(workdir, "btrfs", size=size)


@pytest.fixture(scope="session")
def btrfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a btrfs loop mount made for the session (skips with the exact reason where
    it cannot be made). Tests share it: create your own uniquely named entries inside."""
    try:
        with loop_btrfs(tmp_path_factory.mktemp("btrfs")) as mnt:
            data = mnt / "data"
            data.mkdir()
            yield data
    except MountRefused as e:
        if os.environ.get(REQUIRE_MOUNTS) == "1":
            # CI's root lane: a missing mkfs.btrfs must not turn the reflink tests into skips.
            pytest.fail(f"btrfs loop mount unavailable but {REQUIRE_MOUNTS}=1: {e}")
        pytest.skip(f"btrfs loop mount unavailable: {e}")


@contextlib.contextmanager
def tmpfs(mnt: Path, *, size: str = "2m", mode: str = "0755") -> Iterator[Path]:
    """Mount a ``size`` tmpfs on ``mnt`` (created if missing) for the ``with`` body; unmount
    on exit. Raises MountRefused with the reason where that cannot be done."""
    mnt.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        _umount(mnt)


def remount(mnt: Path, option: str) -> None:
    """``mount -o remount,OPTION MNT`` (e.g. ``ro`` / ``rw``)."""
    _run(["mount", "-o", f"remount,{option}", str(mnt)])


def fill_to_the_brim(mnt: Path, name: str = "filler") -> Path:
    """Append to ``mnt/name`` until the filesystem refuses another byte; return its path."""
    path = mnt / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            block = bytes(chunk)
            try:
                while True:
                    os.write(fd, block)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
    finally:
        os.close(fd)
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for one test (to provoke ENOSPC); skips with the reason."""
    try:
        with tmpfs(tmp_path / "small-tmpfs", size="2m") as mnt:
            yield mnt
    except MountRefused as e:
        pytest.skip(f"tmpfs mount unavailable: {e}")


@pytest.fixture(autouse=True)
def _no_mount_left_in_tmp_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used ``tmp_path``: detach what is still mounted below it (deepest
    first). The code under test unmounts its overlays itself and tests assert that; this is
    for a test that failed first (or a mutant under ``make mutation``), whose mounts would
    otherwise stay for the life of the machine and break pytest's cleanup of old tmp dirs."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or os.geteuid() != 0:
        return
    prefix = f"{tmp}/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=_TIMEOUT)
