"""Staging: where entries are built before they are published, who owns them, and the one
sweeper of what dead processes left.

Everything is built in a staging directory under ``.forgespace/tmp`` (same filesystem, so
publishing is a rename) named ``{target_id}~{purpose}~{owner token}~{random}``. Its owner holds
an exclusive flock on ``.forgespace/owners/{token}.lock`` for its whole life (``OwnerToken``).
When that lock can be taken the owner is dead (the kernel released it) and the staging
directory is garbage, whatever its age. ``.forgespace/trash/*`` is always garbage (already
invisible). ``sweep_leftovers`` removes all of this; gc plans the same with ``dead_staging``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forgespace.cache import fsops
from forgespace.errors import CacheAccessError, ForgespaceError, UnsafeCacheEntryError
from forgespace.layout import OVERLAY_ATTEMPT_FILE, CacheLayout

_HOST = socket.gethostname()
log = logging.getLogger(__name__)


class OwnerToken:
    """This process's owner lock: proves that staging directories tagged with
    ``token`` belong to a live process.

    One per (process, owners dir); forked children re-create their own on first use.
    ``root`` (CACHE_DIR) is where the walk to ``owners_dir`` starts (never following a
    symlink below it); without it ``owners_dir`` is trusted as given.
    """

    _lock = threading.Lock()
    _by_dir: dict[tuple[int, str], OwnerToken] = {}

    def __init__(self, owners_dir: Path, *, root: Path | None = None) -> None:
        try:
            self._create(owners_dir, root)
        except OSError as exc:
            if isinstance(exc, ForgespaceError):
                raise
            # opened relative to a directory fd: name the whole path, and what was being done
            if exc.filename is not None and not os.path.isabs(str(exc.filename)):
                exc.filename = str(owners_dir / str(exc.filename))
            raise CacheAccessError.from_os_error(exc, "create an owner lock") from exc

    def _create(self, owners_dir: Path, root: Path | None) -> None:
        dfd = _owners_fd(owners_dir, root, create=True)
        try:
            for _ in range(10):
                self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
                self.path = owners_dir / f"{self.token}.lock"
                # Locked under a temporary name, then renamed: the final name never exists
                # unlocked, so no cleaner can mistake a just-created owner for a dead one.
                # O_EXCL never follows a planted link.
                tmp = f".{self.token}.new"
                fd = os.open(
                    tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
                info = f"pid={os.getpid()} host={_HOST} since={time.time():.3f}\n"
                os.pwrite(fd, info.encode(), 0)
                try:
                    os.rename(tmp, self.path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except FileNotFoundError:
                    # a cleaner took the temporary file in the instant before our flock
                    os.close(fd)
                    continue
                self._fd = fd
                return
        finally:
            os.close(dfd)
        raise OSError(f"could not create an owner lock in {owners_dir}")

    def alive(self) -> bool:
        """Whether our lock file is still the one we hold (a run may have deleted it)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    @classmethod
    def for_dir(cls, owners_dir: Path, *, root: Path | None = None) -> OwnerToken:
        key = (os.getpid(), str(owners_dir))
        with cls._lock:
            tok = cls._by_dir.get(key)
            if tok is None or not tok.alive():
                tok = cls(owners_dir, root=root)
                cls._by_dir[key] = tok
            return tok


def _owners_fd(owners_dir: Path, root: Path | None, *, create: bool = False) -> int:
    if root is None:
        if create:
            owners_dir.mkdir(parents=True, exist_ok=True)
        return os.open(owners_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return fsops.open_dir(root, fsops.parts_under(root, owners_dir), create=create)


def _open_owner(owners_dir: Path, name: str, root: Path | None) -> int | None:
    """The owner lock file ``name`` opened without following links; None when it is missing.
    A planted entry (symlink, non-regular, hard-linked) raises UnsafeCacheEntryError."""
    try:
        return fsops.open_lock(
            owners_dir if root is None else root, owners_dir / name, create=False
        )
    except FileNotFoundError:
        return None


def owner_is_dead(owners_dir: Path, token: str, *, root: Path | None = None) -> bool:
    """True when no live process holds the owner lock named ``token``.

    Takes the lock non-blocking: success means its holder died (the kernel released
    it). A planted entry in place of the lock file (a symlink...) is never followed: the
    owner then counts as alive (its staging directory is kept) and a warning names it.
    """
    try:
        fd = _open_owner(owners_dir, f"{token}.lock", root)
    except UnsafeCacheEntryError as exc:
        log.warning("%s", exc)
        return False
    if fd is None:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # pragma: no cover - e.g. ENOLCK on odd filesystems
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    finally:
        os.close(fd)


def remove_dead_owner(owners_dir: Path, token: str, *, root: Path | None = None) -> None:
    """Delete a dead owner's lock file (call only after its staging dirs are gone).

    ``token`` may also be a file name ``.{token}.new`` (an owner killed while creating
    its lock file). A planted entry under that name is left alone (``cache verify``
    reports it)."""
    name = token if token.endswith(".new") else f"{token}.lock"
    try:
        fd = _open_owner(owners_dir, name, root)
    except UnsafeCacheEntryError as exc:
        log.warning("%s", exc)
        return
    if fd is None:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        with contextlib.suppress(FileNotFoundError):
            dfd = _owners_fd(owners_dir, root)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                own = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                    os.unlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)
    finally:
        os.close(fd)


STAGING_SEP = "~"  # never in an id, so a staging name parses without ambiguity


# A file name may have 255 bytes (NAME_MAX); a 128-character target id plus a 128-character
# run id does not fit, and a staging dir's trash name adds a suffix. Longer purposes are cut
# and end in "#" + a digest ("#" is never in an id); see purpose_matches.
STAGING_NAME_MAX = 200
_PURPOSE_DIGEST = 16


def _purpose_digest(purpose: str) -> str:
    return hashlib.sha256(purpose.encode()).hexdigest()[:_PURPOSE_DIGEST]


def staging_name(target_id: str, purpose: str, token: str, suffix: str) -> str:
    """``{target_id}~{purpose}~{owner token}~{suffix}``: the name of a staging directory in
    ``.forgespace/tmp``. Its owner holds ``.forgespace/owners/{token}.lock`` while alive.
    At most STAGING_NAME_MAX characters: a long purpose is shortened (purpose_matches)."""
    name = STAGING_SEP.join((target_id, purpose, token, suffix))
    excess = len(name) - STAGING_NAME_MAX
    if excess > 0:
        keep = max(0, len(purpose) - excess - _PURPOSE_DIGEST - 1)
        short = f"{purpose[:keep]}#{_purpose_digest(purpose)}"
        name = STAGING_SEP.join((target_id, short, token, suffix))
    return name


def purpose_matches(shown: str, purpose: str) -> bool:
    """Whether ``shown`` (the purpose part of a staging name) stands for ``purpose``."""
    if shown == purpose:
        return True
    head, sep, digest = shown.rpartition("#")
    return bool(sep) and purpose.startswith(head) and digest == _purpose_digest(purpose)


def parse_staging_name(name: str) -> tuple[str, str, str] | None:
    """(target_id, purpose, owner token) of a staging directory name, or None if the name
    is not one of ours. A staging dir is garbage iff ``owner_is_dead(owners_dir, token)``."""
    parts = name.split(STAGING_SEP)
    if len(parts) != 4 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def owners_dir(layout: CacheLayout) -> Path:
    """Where owner lock files live."""
    return layout.meta_dir / "owners"


@dataclass(frozen=True)
class StagingDir:
    """A staging directory found in ``.forgespace/tmp``, parsed from its name."""

    path: Path
    target_id: str
    purpose: str
    token: str


def dead_staging(layout: CacheLayout, target_id: str | None = None) -> list[StagingDir]:
    """Staging directories (of ``target_id`` or all) whose owner process is dead: recognised
    by its lock, never by age. Reads only."""
    root = layout.root
    out: list[StagingDir] = []
    dead: dict[str, bool] = {}
    for name in sorted(fsops.listdir(root, fsops.parts_under(root, layout.tmp_dir))):
        parsed = parse_staging_name(name)
        if parsed is None or (target_id is not None and parsed[0] != target_id):
            continue
        tid, purpose, token = parsed
        if token not in dead:
            dead[token] = owner_is_dead(owners_dir(layout), token, root=root)
        if dead[token]:
            out.append(StagingDir(layout.tmp_dir / name, tid, purpose, token))
    return out


@contextlib.contextmanager
def staging_dir(layout: CacheLayout, target_id: str, purpose: str) -> Iterator[Path]:
    """A fresh staging dir owned by this process; removed on exit unless renamed away."""
    root = layout.root
    token = OwnerToken.for_dir(owners_dir(layout), root=root).token
    name = staging_name(target_id, purpose, token, uuid.uuid4().hex[:8])
    stage = layout.tmp_dir / name
    # Everything is written through the pinned path (/proc/self/fd/N): a run that swaps
    # .forgespace/tmp meanwhile cannot redirect a download or an extraction outside.
    pinned = fsops.make_pinned_dir(root, stage)
    try:
        yield pinned
    finally:
        try:
            if fsops.pinned_still_in_place(pinned):  # not published: ours to remove
                fsops.unmount_under([stage], root=root)
                fsops.discard(root, stage)
        finally:
            fsops.unpin(pinned)


def remove_staging(layout: CacheLayout, item: StagingDir) -> list[Path]:
    """Remove a dead owner's staging directory and then the overlay upper/work directories
    of the target that nothing owns any more (sweep_overlays: the dead attempt's go, a live
    retry's of the same run stay). Returns what was removed."""
    root = layout.root
    fsops.unmount_under([item.path], root=root)
    fsops.discard(root, item.path)
    removed = [item.path]
    if item.purpose.startswith("run-"):
        removed.extend(sweep_overlays(layout, item.target_id))
    return removed


# --- overlay upper/work directories ----------------------------------------------------------
# Each staging attempt of an overlay-backed run has its own ``overlay/{tid}/{rid}/{staging
# name}/{upper,work}``: a retry of the same run never shares (or deletes) a dead attempt's. The
# attempt owns it while its staging directory exists and its owner lives; the published run
# owns it afterwards (its OVERLAY_ATTEMPT_FILE names the attempt, written in staging so the
# hand-over is the publish rename itself). Anything else is garbage unless it is mounted.


def overlay_attempt_dir(layout: CacheLayout, target_id: str, run_id: str, stage: Path) -> Path:
    """Where the staging attempt ``stage`` (its path or its pinned path) keeps the upper/work
    directories of run ``run_id``: named after the staging directory."""
    return layout.overlay_dir / target_id / run_id / fsops.shown(stage).name


def run_overlay_base(layout: CacheLayout, target_id: str, run_id: str) -> Path | None:
    """The directory holding the upper/work directories a published overlay run uses, or
    None (not an overlay run, or its attempt is unknown). Run directories of older versions
    kept them at ``overlay/{tid}/{rid}`` itself."""
    run_base = layout.overlay_dir / target_id / run_id
    try:
        fd = os.open(
            layout.run_dir(target_id, run_id) / OVERLAY_ATTEMPT_FILE,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
        )
    except OSError:
        return run_base if os.path.isdir(run_base / "upper") else None
    try:
        attempt = os.read(fd, 1024).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if parse_staging_name(attempt) is None or "/" in attempt:
        return None  # not a name we write: never follow it anywhere
    return run_base / attempt


def _overlay_owned(
    layout: CacheLayout, tid: str, rid: str, attempt: str, owners: dict[str, bool]
) -> bool:
    """Whether the attempt directory ``attempt`` of run ``rid`` still has an owner (``""``:
    an older version's ``overlay/{tid}/{rid}`` itself, owned by the run directory alone)."""
    if attempt == "":
        return os.path.lexists(layout.run_dir(tid, rid))
    parsed = parse_staging_name(attempt)
    # 1. its staging attempt is alive (checked first: publishing hands it to step 2 by the
    # rename that moves the staging directory, with its OVERLAY_ATTEMPT_FILE, into place)
    if parsed is not None and os.path.lexists(layout.tmp_dir / attempt):
        token = parsed[2]
        if token not in owners:
            owners[token] = not owner_is_dead(owners_dir(layout), token, root=layout.root)
        if owners[token]:
            return True
    # 2. the published run uses it
    base = run_overlay_base(layout, tid, rid)
    return base is not None and base.name == attempt


def sweep_overlays(layout: CacheLayout, target_id: str | None = None) -> list[Path]:
    """Remove overlay upper/work directories (of ``target_id`` or all) that no live staging
    attempt and no run directory owns, never one that is the upper layer of a mounted
    overlay. Safe without the target lock. Returns what was removed."""
    root = layout.root
    removed: list[Path] = []
    try:
        tids = (
            [target_id]
            if target_id is not None
            else fsops.listdir(root, fsops.parts_under(root, layout.overlay_dir))
        )
    except FileNotFoundError:
        return removed
    mounted: set[Path] | None = None
    owners: dict[str, bool] = {}
    for tid in sorted(tids):
        if tid.startswith("."):  # the start-up probe's scratch space
            continue
        tdir = layout.overlay_dir / tid
        try:
            rids = fsops.listdir(root, fsops.parts_under(root, tdir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for rid in sorted(rids):
            rdir = tdir / rid
            try:
                names = fsops.listdir(root, fsops.parts_under(root, rdir))
            except (FileNotFoundError, NotADirectoryError):
                continue
            # an older version's layout: upper/work directly in the run's directory
            legacy = "upper" in names or "work" in names
            for attempt in [""] if legacy else sorted(names):
                if _overlay_owned(layout, tid, rid, attempt, owners):
                    continue
                path = rdir / attempt if attempt else rdir
                if mounted is None:
                    mounted = overlay_uppers()
                upper = path / "upper"
                if upper in mounted or Path(os.path.realpath(upper)) in mounted:
                    continue
                fsops.remove(root, path)
                removed.append(path)
            for empty in (rdir, tdir):
                with contextlib.suppress(OSError):
                    os.rmdir(empty)
    return removed


def overlay_uppers() -> set[Path]:
    """Upper directories of mounted overlays (none where mountinfo cannot be read)."""
    from forgespace.cache import overlay

    try:
        return overlay.upper_dirs()
    except OSError:  # pragma: no cover - no /proc
        return set()


def remove_dead_owners(layout: CacheLayout) -> None:
    """Delete the owner lock files of dead processes whose staging directories are all gone
    (and the ``.new`` files of owners killed while creating theirs). An owner file only ever
    exists under its final name while locked (OwnerToken), so no age rule is needed."""
    root = layout.root
    tmp = fsops.parts_under(root, layout.tmp_dir)
    in_use = {p[2] for n in fsops.listdir(root, tmp) if (p := parse_staging_name(n))}
    odir = owners_dir(layout)
    for name in fsops.listdir(root, fsops.parts_under(root, odir)):
        if name.endswith(".new"):
            remove_dead_owner(odir, name, root=root)
            continue
        token = name.removesuffix(".lock")
        if token not in in_use and owner_is_dead(odir, token, root=root):
            remove_dead_owner(odir, token, root=root)


def sweep_leftovers(layout: CacheLayout, target_id: str | None = None) -> list[Path]:
    """Remove staging dirs of dead processes (of ``target_id`` or all), the overlay upper/work
    dirs nothing owns (sweep_overlays) and, for a full sweep, the trash and dead owner lock
    files. Returns what was removed.

    Safe at any time and without the target lock: a staging dir is only removed when its
    owner's lock is free, i.e. its owner process is dead."""
    removed: list[Path] = []
    for item in dead_staging(layout, target_id):
        removed.extend(remove_staging(layout, item))
    removed.extend(p for p in sweep_overlays(layout, target_id) if p not in removed)
    if target_id is None:
        trash = fsops.clear_dir(layout.root, fsops.TRASH)
        removed.extend(layout.trash_dir / n for n in trash)
        remove_dead_owners(layout)
    if removed:
        log.info("removed %d leftover(s) of dead processes: %s", len(removed), removed[:5])
    return removed
