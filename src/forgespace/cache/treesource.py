"""Sealed trees as the worker's copy of the blobs they hold (btrfs).

A read-only tree built from blobs on btrfs is sealed (cache/snapshot.py) and keeps no second
copy of its blobs in the local blob store: a verified blob goes from the fetch to the tree
through memory (``blobstore._Sink``: written to a local pack only when the fetch runs far
ahead of the build). So when a later build needs a blob the local packs lack, the sealed trees
the index holds are asked first (``Sources``): a tree whose seal lists a file with that sha256
is a *holder*, and its file is copied (copy_file_range: block sharing on btrfs) instead of
fetching the blob again. Typical: a fuzzer's isolated run of a target a scanner holds shared.

A holder is exactly as trusted as a snapshot base: before use, under its target's lock taken
shared and non-blocking (gc cannot remove it meanwhile; skipped for the tree of the target
being built read-only, whose lock the build already holds exclusive), it must be the sealed
subvolume (root inode, uuid) and ``snapshot.verify`` must find every sealed entry with its
sealed inode and ctime. Each file is then reached one directory at a time without following
a symlink, each directory checked against the seal, ``fstatat`` before ``open`` (never a
FIFO or device opened) and ``fstat`` after (device, inode, ctime, size, mode as sealed), and
checked again after the copy: ctime cannot be set back, so a file whose ctime is unchanged
after the copy was not written during it (and its sealed size must be the manifest's). A tree
that fails any check is not used again by this build (``HolderFailed``:
``blobstore.materialise`` starts over without it and fetches what it held). Candidates are
the MAX_CANDIDATES most recently used sealed trees whose seal's sketch shares at least one
digest with the manifest (no seal of an unrelated target is decoded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from forgespace.cache import fsops, snapshot
from forgespace.errors import ForgespaceError, LockTimeoutError

if TYPE_CHECKING:
    from forgespace.cache.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["HolderFailed", "Sources"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class HolderFailed(ForgespaceError):
    """A sealed tree stopped matching its seal while a build copied from it."""

    def __init__(self, holder: Holder, why: str) -> None:
        super().__init__(f"sealed tree {holder.shown} not used ({why}): fetching its blobs")
        self.holder = holder


@dataclass
class Holder:
    """A sealed tree holding blobs a build needs: digest -> the path of a file with it."""

    tid: str
    parts: tuple[str, ...]
    seal: snapshot.SealRecord
    files: dict[str, str]
    shown: str = ""
    fd: int = -1
    dev: int = 0
    _anchor: tuple[str, int] | None = field(default=None, repr=False)

    def open(self, engine: Engine, locked: bool, stack: contextlib.ExitStack) -> str | None:
        """Lock (unless ``locked``), open and verify the tree; None when usable (then held,
        lock and fd, until ``stack`` closes), else why not (nothing held)."""
        with contextlib.ExitStack() as mine:
            try:
                if not locked:
                    mine.enter_context(
                        engine.target_lock(
                            self.tid, exclusive=False, blocking=False, purpose="copy blobs from"
                        )
                    )
                self.fd = fsops.open_dir(engine.layout.root, self.parts)
                mine.callback(self.close)
                why = snapshot.not_the_sealed_subvolume(self.fd, self.seal)
                if why is not None:
                    return why
                self.dev = os.fstat(self.fd).st_dev
                why = snapshot.verify(self.fd, self.seal)
            except LockTimeoutError:
                return "it is busy (gc or a rebuild)"
            except (OSError, ForgespaceError) as exc:
                return str(exc)
            if why is not None:
                return f"it was modified since it was sealed: {why}"
            stack.enter_context(mine.pop_all())
        return None

    def open_file(self, digest: str) -> tuple[int, snapshot.SealEntry]:
        """An fd of the sealed file holding ``digest``, checked (see the module)."""
        rel = self.files[digest]
        want = self.seal.entries[rel]
        head, _, name = rel.rpartition("/")
        dfd = self._dir(head)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise HolderFailed(self, f"{rel!r}: {exc.strerror}") from None
        if not self._is(st, want):
            raise HolderFailed(self, f"{rel!r} was modified or replaced")
        try:
            fd = os.open(name, _FILE, dir_fd=dfd)
        except OSError as exc:  # replaced since the fstatat (by a symlink: ELOOP)
            raise HolderFailed(self, f"{rel!r}: {exc.strerror}") from None
        if not self._is(os.fstat(fd), want):
            os.close(fd)
            raise HolderFailed(self, f"{rel!r} was replaced")
        return fd, want

    def still(self, fd: int, digest: str, want: snapshot.SealEntry) -> None:
        """HolderFailed unless the file ``fd`` is as sealed (after copying from it)."""
        if not self._is(os.fstat(fd), want):
            raise HolderFailed(self, f"{self.files[digest]!r} was modified while copied")

    def _is(self, st: os.stat_result, want: snapshot.SealEntry) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_dev == self.dev
            and (st.st_ino, st.st_ctime_ns, st.st_size, stat.S_IMODE(st.st_mode))
            == (want[1], want[2], want[4], want[5])
        )

    def _dir(self, head: str) -> int:
        """An fd of the tree's directory ``head``, opened one sealed directory at a time."""
        if not head:
            return self.fd
        if self._anchor is not None and self._anchor[0] == head:
            return self._anchor[1]
        self._drop_anchor()
        fd = os.dup(self.fd)
        try:
            rel = ""
            for part in head.split("/"):
                rel = f"{rel}/{part}" if rel else part
                try:
                    nfd = os.open(part, _DIR, dir_fd=fd)
                except OSError as exc:
                    raise HolderFailed(self, f"{rel!r}: {exc.strerror}") from None
                os.close(fd)
                fd = nfd
                st, want = os.fstat(fd), self.seal.entries.get(rel)
                if want is None or want[0] != "d" or st.st_dev != self.dev:
                    raise HolderFailed(self, f"{rel!r} is not a sealed directory")
                if (st.st_ino, st.st_ctime_ns) != (want[1], want[2]):
                    raise HolderFailed(self, f"{rel!r} (a directory) was modified or replaced")
        except BaseException:
            os.close(fd)
            raise
        self._anchor = (head, fd)
        return fd

    def _drop_anchor(self) -> None:
        if self._anchor is not None:
            os.close(self._anchor[1])
            self._anchor = None

    def close(self) -> None:
        self._drop_anchor()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Sources:
    """The usable holders of a build's missing blobs (``digests``: digest -> Holder), held
    (locked, open) until ``close``."""

    def __init__(self) -> None:
        self.digests: dict[str, Holder] = {}
        self._stack = contextlib.ExitStack()

    @classmethod
    def find(
        cls,
        engine: Engine,
        tid: str,
        read_only: bool,
        wanted: set[str],
        sketch: Callable[[], list[int]],
        refused: Iterable[tuple[str, tuple[str, ...]]] = (),
    ) -> Sources:
        """Holders of the blobs ``wanted`` for a build of ``tid`` (``read_only``: under its
        exclusive lock) whose manifest's sketch ``sketch`` gives (asked only when a sealed
        tree is there); trees in ``refused`` (target id, parts) are not asked."""
        out = cls()
        trees = snapshot.sealed_trees(engine) if wanted else []
        if not trees:
            return out
        mine = set(sketch())
        skip = set(refused)
        root = engine.layout.root
        left = set(wanted)
        for tree in trees:
            if not left:
                break
            if (tree.tid, tree.parts) in skip:
                continue
            holder = _holder(root, tree, mine, left)
            if holder is None:
                continue
            holder.shown = f"{root}/{'/'.join(tree.parts)}"
            locked = read_only and tree.tid == tid
            why = holder.open(engine, locked, out._stack)
            if why is not None:
                log.warning("sealed tree %s not used (%s): fetching its blobs", holder.shown, why)
                continue
            log.info(
                "target %s: %d blob(s) copied from the sealed tree %s",
                tid,
                len(holder.files),
                holder.shown,
            )
            out.digests.update(dict.fromkeys(holder.files, holder))
            left -= holder.files.keys()
        return out

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holder(
    root: Path, tree: snapshot.SealedTree, mine: set[int], wanted: set[str]
) -> Holder | None:
    """The holder of some of ``wanted`` in ``tree``, if its seal's sketch shares a digest with
    ``mine`` (else the rest of its seal is not read)."""
    try:
        if not mine.intersection(snapshot.seal_sketch(root, tree.seal)):
            return None
        seal = snapshot.read_seal(root, tree.seal)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ForgespaceError):
        return None
    files: dict[str, str] = {}
    for rel, se in seal.entries.items():
        if se[0] == "f" and se[6] in wanted and se[6] not in files:
            files[se[6]] = rel
    return Holder(tree.tid, tree.parts, seal, files) if files else None
