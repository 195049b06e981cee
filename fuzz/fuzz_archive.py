"""Fuzz forgespace's own archive reader: tar (plain, gzip, bzip2, xz), zip and the member checks.

Run through libFuzzer (see ``make fuzz``)::

    python fuzz/fuzz_archive.py NEW_INPUTS_DIR fuzz/corpus/archive -max_total_time=90

Each input is written to a file and handed to ``detect_archive`` and then ``extract_archive``
(and, read as a stream, to ``extract_tar_stream``, which must agree: same tree, same refusal)
with a small byte and member limit, so bombs hit the limits at once. The refusals the module
documents (``UnsafeArchiveError``, ``IntegrityError``, ``CacheFullError``) are expected; any
other exception is a finding (libFuzzer stops and keeps the input). After every input the
harness also checks, independently of the extractor, what it promises:

- nothing appeared beside the destination and the sentinel directory ``outside/`` (the sibling
  that ``../outside/...`` names reach) still holds only its untouched secret;
- after a refusal the destination is gone;
- after a success the tree holds only directories, regular files and symlinks, at most
  ``MAX_BYTES`` bytes of file data, and no symlink resolves outside the destination (by the
  kernel's own resolution, one directory-fd step at a time, so a chain of links and trees deeper
  than PATH_MAX are judged as the kernel would follow them).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

# zipfile is the zip parser the reader relies on: instrument it with our module so the fuzzer
# sees its branches too (it must not be imported before this block for the hook to apply).
with atheris.instrument_imports(include=["forgespace.cache.archive", "zipfile"]):
    from forgespace.cache.archive import detect_archive, extract_archive, extract_tar_stream
    from forgespace.errors import CacheFullError, IntegrityError, UnsafeArchiveError

from forgespace.cache import fsops  # after the block: only the reader is instrumented

# Small limits: a bomb is refused after a few chunks instead of inflating megabytes per input.
MAX_BYTES = 64 * 1024
MAX_MEMBERS = 256
EXPECTED = (UnsafeArchiveError, IntegrityError, CacheFullError)
SECRET = b"must stay untouched\n"
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _scratch_root() -> str:
    """Where inputs are extracted: ``FORGESPACE_FUZZ_DIR`` (an empty directory the caller
    removes afterwards, as ``make fuzz`` does: libFuzzer ends the process with C ``exit()``, so
    no Python clean-up runs) or a new directory on tmpfs when there is one, since every input
    writes and removes a small tree."""
    given = os.environ.get("FORGESPACE_FUZZ_DIR")
    if given:
        return given
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="forgespace-fuzz-", dir=base)


ROOT = _scratch_root()
ARCHIVE = os.path.join(ROOT, "archive")
# A long destination name, like a real cache path: absolute paths of deep members then pass
# PATH_MAX while their relative paths do not, the regime where path-based checks go blind.
DEST_NAME = "dest-" + "d" * 200
DEST = os.path.join(ROOT, DEST_NAME)
OUTSIDE = os.path.join(ROOT, "outside")
os.mkdir(OUTSIDE)
with open(os.path.join(OUTSIDE, "secret"), "wb") as _f:
    _f.write(SECRET)
ROOT_ENTRIES = sorted(os.listdir(ROOT))  # "outside" only: the archive file comes per input


class InvariantError(AssertionError):
    """The extractor returned (or refused) yet left the file system in a state it promises
    never to leave."""


# ---- removal and walking, by directory fd (any depth, any mode) -----------------------------


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory of the extracted tree for listing, whatever mode the archive gave it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:  # a 000 directory when not running as root
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def _remove_tree(path: str) -> None:
    """Remove an extracted tree with the cache's own removal (iterative, through directory
    fds: trees deeper than PATH_MAX and 000 directories go too)."""
    fsops.remove(Path(os.path.dirname(path)), path)


def _walk(root_fd: int) -> list[tuple[str, os.stat_result]]:
    """Every entry below ``root_fd`` as (relative path, lstat), without following links."""
    out: list[tuple[str, os.stat_result]] = []
    todo: list[tuple[int, str]] = [(os.dup(root_fd), "")]
    while todo:
        fd, rel = todo.pop()
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    path = f"{rel}/{entry.name}" if rel else entry.name
                    st = entry.stat(follow_symlinks=False)
                    out.append((path, st))
                    if stat.S_ISDIR(st.st_mode):
                        todo.append((_open_dir(entry.name, fd), path))
        finally:
            os.close(fd)
    return out


# ---- symlink containment, by the kernel's resolution --------------------------------------


def _depth_below(fd: int, root: tuple[int, int]) -> int | None:
    """How many levels ``fd`` (a directory) lies below ``root`` (dev, ino); None if outside."""
    depth = 0
    cur = os.dup(fd)
    try:
        while True:
            st = os.fstat(cur)
            if (st.st_dev, st.st_ino) == root:
                return depth
            up = os.open("..", _DIR_FLAGS, dir_fd=cur)
            ust = os.fstat(up)
            os.close(cur)
            cur = up
            if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                return None  # reached the file-system root without meeting the destination
            depth += 1
    finally:
        os.close(cur)


def _link_escapes(root_fd: int, root: tuple[int, int], rel: str) -> str | None:
    """Why the symlink ``rel`` (relative to the destination) resolves outside it, or None.

    The directory part of the target is followed by the kernel one component at a time from
    the link's own directory; whatever does not exist is judged lexically from where resolution
    stopped. The last component, when it is a name, stays in the directory reached (if it is
    itself a link, that link is checked on its own).
    """
    parent, _, name = rel.rpartition("/")
    target = os.readlink(rel, dir_fd=root_fd) if len(rel) < 4096 else None
    if target is None:
        pfd = os.open(parent, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
        target = os.readlink(name, dir_fd=pfd)
        os.close(pfd)
    if target.startswith("/"):
        return f"absolute target {target!r}"
    parts = [p for p in target.split("/") if p and p != "."]
    if parts and parts[-1] != "..":
        parts.pop()
    cur = os.open(parent, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd) if parent else os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=cur)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
                    raise
                depth = _depth_below(cur, root)
                if depth is None:
                    return f"target {target!r} passes outside the destination"
                for rest in parts[i:]:
                    depth += -1 if rest == ".." else 1
                    if depth < 0:
                        return f"target {target!r} leaves the destination (lexically)"
                return None
            os.close(cur)
            cur = nxt
        if _depth_below(cur, root) is None:
            return f"target {target!r} resolves outside the destination"
        return None
    finally:
        os.close(cur)


# ---- the invariants ------------------------------------------------------------------------


def _check_outside(extracted: bool) -> None:
    entries = sorted(os.listdir(ROOT))
    expected = sorted([*ROOT_ENTRIES, "archive", *([DEST_NAME] if extracted else [])])
    if entries != expected:
        raise InvariantError(f"entries beside the destination changed: {entries} != {expected}")
    inside = os.listdir(OUTSIDE)
    if inside != ["secret"]:
        raise InvariantError(f"the sentinel directory now holds {inside}")
    with open(os.path.join(OUTSIDE, "secret"), "rb") as f:
        if f.read() != SECRET:
            raise InvariantError("the sentinel secret was modified")


def _check_tree() -> None:
    root_fd = os.open(DEST, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        rst = os.fstat(root_fd)
        root = (rst.st_dev, rst.st_ino)
        total = 0
        inodes: set[int] = set()
        for rel, st in _walk(root_fd):
            mode = st.st_mode
            if stat.S_ISREG(mode):
                if st.st_ino not in inodes:
                    inodes.add(st.st_ino)
                    total += st.st_size
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    raise InvariantError(f"{rel!r} kept a setuid/setgid bit ({oct(mode)})")
            elif stat.S_ISLNK(mode):
                why = _link_escapes(root_fd, root, rel)
                if why is not None:
                    raise InvariantError(f"symlink {rel!r}: {why}")
            elif not stat.S_ISDIR(mode):
                raise InvariantError(f"{rel!r} is a special file ({oct(mode)})")
        if total > MAX_BYTES:
            raise InvariantError(f"{total} bytes of files extracted, above {MAX_BYTES}")
    finally:
        os.close(root_fd)


def TestOneInput(data: bytes) -> None:
    """One input: detect, extract with small limits, check the invariants, clean up."""
    with open(ARCHIVE, "wb") as f:
        f.write(data)
    # Deterministic per input, so a crash reproduces; covers the read-only code paths too.
    read_only = bool(zlib.crc32(data) & 1)
    detect_archive(ARCHIVE)  # the artifact rule reads the zip's directory: it must not raise
    kind = detect_archive(ARCHIVE, artifacts=True)  # what extract_archive accepts
    extracted = False
    try:
        if kind is None:
            try:
                extract_archive(ARCHIVE, DEST, max_bytes=MAX_BYTES, max_members=MAX_MEMBERS)
            except UnsafeArchiveError:
                pass
            else:
                raise InvariantError("a non-archive was extracted")
        else:
            try:
                stats = extract_archive(
                    ARCHIVE,
                    DEST,
                    max_bytes=MAX_BYTES,
                    max_members=MAX_MEMBERS,
                    read_only=read_only,
                )
            except EXPECTED:
                pass
            else:
                extracted = True
                if stats.bytes > MAX_BYTES:
                    raise InvariantError(f"stats report {stats.bytes} bytes, above {MAX_BYTES}")
        if not extracted and os.path.lexists(DEST):
            raise InvariantError("a refused archive left its destination behind")
        _check_outside(extracted)
        if extracted:
            _check_tree()
        _check_streamed(kind, _snapshot(DEST) if extracted else None, read_only)
    finally:
        _remove_tree(DEST)


Tree = dict[str, tuple[int, bytes]]


def _snapshot(root: str) -> Tree:
    """rel path -> (mode, content or link target) of a tree, for comparing two extractions."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                body = os.fsencode(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            else:
                body = b""
            out[os.path.relpath(p, root)] = (st.st_mode, body)
    return out


def _check_streamed(kind: str | None, by_file: Tree | None, ro: bool) -> None:
    """The streamed extractor (what a download feeds) must agree with the file extractor: a
    tar it accepts gives the same tree, one it refuses is refused, anything else is left to
    the file path (None, nothing created)."""
    _remove_tree(DEST)
    with open(ARCHIVE, "rb", buffering=0) as f:
        try:
            stats = extract_tar_stream(
                f, DEST, archive="fuzz", max_bytes=MAX_BYTES, max_members=MAX_MEMBERS, read_only=ro
            )
        except EXPECTED:
            stats, refused = None, True
        else:
            refused = False
    if kind != "tar":
        if stats is not None or refused or os.path.lexists(DEST):
            raise InvariantError(f"the streamed extractor took a {kind or 'non-archive'}")
        return
    if (by_file is None) != refused:
        said = ("refused", "accepted") if by_file is None else ("accepted", "refused")
        raise InvariantError(f"file extraction {said[0]} what the streamed one {said[1]}")
    if by_file is not None and _snapshot(DEST) != by_file:
        raise InvariantError("the streamed extraction differs from the file extraction")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
