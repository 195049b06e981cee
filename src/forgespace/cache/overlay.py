"""overlayfs mounts for the opt-in copy-on-write backend.

A run's workspace is an overlay whose lower layer is the read-only shared copy; writes land in a
per-run upper directory. Mounting uses the mount(2) syscall through ctypes (~1 ms less than
spawning the ``mount`` binary, see docs/benchmarks.md), so it needs CAP_SYS_ADMIN (root).
:func:`probe_overlay` performs a real test mount so a host that refuses overlays fails at
start-up with the reason, not at the first run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import time
import uuid
from pathlib import Path

from forgespace.errors import BackendUnavailableError

__all__ = ["mount_overlay", "mounts_under", "probe_overlay", "unmount", "upper_dirs"]

log = logging.getLogger(__name__)

MNT_DETACH = 2
_MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")
# Errors meaning "overlay mounts cannot work on this host", as opposed to a bad argument.
_UNAVAILABLE = {errno.EPERM, errno.EACCES, errno.ENODEV, errno.ENOSYS}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


def _escape(path: str | os.PathLike[str]) -> str:
    # overlayfs splits its options on ',' and lower layers on ':'; a backslash escapes both.
    p = os.path.abspath(os.fspath(path))
    return p.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(
    lower: str | os.PathLike[str],
    upper: str | os.PathLike[str],
    work: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    volatile: bool = False,
) -> None:
    """Mount an overlay of ``lower`` (read-only) and ``upper`` (writes) on ``mountpoint``.

    ``upper`` and ``work`` must be empty-or-existing directories on the same filesystem;
    ``mountpoint`` must exist. ``volatile=True`` skips syncing the upper layer (faster unmount;
    the upper layer is then unusable after a crash, which suits a throw-away run directory).
    Raises :class:`BackendUnavailableError` when the host refuses overlay mounts and
    ``OSError`` (naming the paths) for other failures.
    """
    opts = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}"
    if volatile:
        opts += ",volatile"
    target = os.fsencode(os.path.abspath(os.fspath(mountpoint)))
    if _lib().mount(b"overlay", target, b"overlay", 0, opts.encode()) != 0:
        err = ctypes.get_errno()
        msg = (
            f"mounting overlay on {os.fsdecode(target)} (lower {lower}, upper {upper}, "
            f"work {work}) failed: {os.strerror(err)}"
        )
        if err in _UNAVAILABLE:
            raise BackendUnavailableError(f"{msg}; overlay mounts need root (CAP_SYS_ADMIN)")
        raise OSError(err, msg)


def unmount(mountpoint: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
    """Unmount ``mountpoint``; a no-op when nothing is mounted there.

    While the mount is busy it is retried for up to ``timeout`` seconds, then detached lazily
    (``MNT_DETACH``: gone from the namespace at once, freed when its last user closes), so this
    always returns within the bound.
    """
    target = os.fsencode(os.path.abspath(os.fspath(mountpoint)))
    lib = _lib()
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if lib.umount2(target, 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not a mount point (any more): already done
        if err == errno.EPERM and not os.path.ismount(target):
            return  # not root, and nothing mounted there to refuse to unmount
        if err != errno.EBUSY:
            raise OSError(err, f"unmounting {os.fsdecode(target)} failed: {os.strerror(err)}")
        if time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    log.warning("%s still busy after %.1f s; detaching it lazily", os.fsdecode(target), timeout)
    if lib.umount2(target, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"lazy unmount of {os.fsdecode(target)} failed: {os.strerror(err)}")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mounts_under(root: str | os.PathLike[str], *, fstype: str | None = None) -> list[Path]:
    """Mount points strictly below ``root`` (not ``root`` itself), deepest first, read from
    /proc/self/mountinfo (its octal escapes for spaces, tabs, newlines and backslashes decoded).
    ``fstype`` keeps only mounts of that filesystem type (``"overlay"``: the ones we make)."""
    base = os.path.realpath(os.fspath(root))
    prefix = base.rstrip("/") + "/"
    found: list[str] = []
    want = fstype.encode() if fstype is not None else None
    with open(_MOUNTINFO, "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) < 5:
                continue
            if want is not None:
                # optional fields end with "-", then the filesystem type
                try:
                    if fields[fields.index(b"-", 5) + 1] != want:
                        continue
                except (ValueError, IndexError):
                    continue
            mp = _unescape(fields[4])
            if mp.startswith(prefix):
                found.append(mp)
    # Deepest first: unmounting in this order never hits a parent that is still in use.
    return [Path(p) for p in sorted(set(found), key=lambda p: (-p.count("/"), p))]


def upper_dirs() -> set[Path]:
    """The upper directories of every overlay mounted in this mount namespace (from the super
    options of /proc/self/mountinfo), as given at mount time and resolved: a directory in
    this set must not be deleted, whatever owns it."""
    found: set[Path] = set()
    with open(_MOUNTINFO, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            try:
                sep = fields.index(b"-", 5)
            except ValueError:
                continue
            if len(fields) < sep + 4 or fields[sep + 1] != b"overlay":
                continue
            # the kernel escapes ',' (and whitespace, '\\') in option values as octal
            for opt in fields[sep + 3].split(b","):
                if opt.startswith(b"upperdir="):
                    upper = _unescape(opt.removeprefix(b"upperdir="))
                    found.update((Path(upper), Path(os.path.realpath(upper))))
    return found


def probe_overlay(scratch_dir: str | os.PathLike[str]) -> None:
    """Check that overlay mounts work with layers in ``scratch_dir`` by mounting one for real:
    a file of the lower layer must show through, a write must land in the upper layer only.
    Everything the probe creates is removed. Raises :class:`BackendUnavailableError` with the
    reason when it does not work."""
    base = Path(scratch_dir) / f".overlay-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    mounted = False
    try:
        try:
            for sub in ("lower", "upper", "work", "mnt"):
                (base / sub).mkdir(parents=True)
            (base / "lower/probe").write_bytes(b"lower")
            mount_overlay(base / "lower", base / "upper", base / "work", base / "mnt")
            mounted = True
            if (base / "mnt/probe").read_bytes() != b"lower":
                raise BackendUnavailableError(
                    "overlay probe: the lower layer does not show through"
                )
            (base / "mnt/probe").write_bytes(b"upper")
            if (base / "lower/probe").read_bytes() != b"lower":
                raise BackendUnavailableError("overlay probe: a write reached the lower layer")
            unmount(base / "mnt")
            mounted = False
            if (base / "upper/probe").read_bytes() != b"upper":
                raise BackendUnavailableError(
                    "overlay probe: the write did not land in the upper layer"
                )
        except BackendUnavailableError:
            raise
        except OSError as e:
            raise BackendUnavailableError(
                f"overlay mounts do not work with layers in {scratch_dir}: {e}"
            ) from e
    finally:
        if mounted:
            with contextlib.suppress(OSError):
                unmount(base / "mnt", timeout=1.0)
        from forgespace.cache import fsops

        with contextlib.suppress(OSError):
            fsops.remove(Path(scratch_dir), base)
