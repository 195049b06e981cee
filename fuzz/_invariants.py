"""What the fuzz harnesses check after every input, independently of the code under test.

Shared by ``fuzz_archive.py`` and ``fuzz_manifest.py``: both build a workspace from untrusted
bytes into a destination inside a scratch root (a ``Sandbox``) and then check what forgespace
promises about it:

- nothing appeared beside the destination and the sentinel directory ``outside/`` (the sibling
  that ``../outside/...`` names reach) still holds only its untouched secret;
- after a refusal the destination is gone;
- after a success the tree holds only directories, regular files and symlinks, no
  setuid/setgid bit, at most the byte limit of file data, and no symlink resolves outside the
  destination (by the kernel's own resolution, one directory-fd step at a time, so a chain of
  links and trees deeper than PATH_MAX are judged as the kernel would follow them).

Import it after a harness's ``atheris.instrument_imports`` block: it imports forgespace's
``fsops``, which must not pull the instrumented modules in first.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from forgespace.cache import fsops

SECRET = b"must stay untouched\n"
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class InvariantError(AssertionError):
    """The code under test returned (or refused) yet left the file system in a state it
    promises never to leave."""


def scratch_root() -> str:
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


# ---- removal and walking, by directory fd (any depth, any mode) -----------------------------


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory of the extracted tree for listing, whatever mode the input gave it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:  # a 000 directory when not running as root
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def remove_tree(path: str) -> None:
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


class Sandbox:
    """A scratch root holding the destination and the sentinel ``outside/secret``.

    The destination has a long name, like a real cache path: absolute paths of deep members
    then pass PATH_MAX while their relative paths do not, the regime where path-based checks
    go blind. ``check_outside`` compares the root's listing with what it held when the sandbox
    was made plus the files a harness writes per input (``per_input``)."""

    def __init__(self, root: str, per_input: Iterable[str] = ()) -> None:
        self.root = root
        self.dest_name = "dest-" + "d" * 200
        self.dest = os.path.join(root, self.dest_name)
        self.outside = os.path.join(root, "outside")
        os.mkdir(self.outside)
        with open(os.path.join(self.outside, "secret"), "wb") as f:
            f.write(SECRET)
        self.per_input = list(per_input)
        self._entries = sorted(os.listdir(root))

    def add_fixture(self, name: str) -> str:
        """Reserve ``name`` beside the destination for something the harness keeps across
        inputs (a store, a cache directory); returns its path."""
        self._entries = sorted({*self._entries, name})
        return os.path.join(self.root, name)

    def check_outside(self, extracted: bool) -> None:
        """Nothing beside the destination changed; the sentinel secret is intact."""
        entries = sorted(os.listdir(self.root))
        expected = sorted(
            {*self._entries, *self.per_input, *([self.dest_name] if extracted else [])}
        )
        if entries != expected:
            raise InvariantError(f"entries beside the destination changed: {entries} != {expected}")
        inside = os.listdir(self.outside)
        if inside != ["secret"]:
            raise InvariantError(f"the sentinel directory now holds {inside}")
        with open(os.path.join(self.outside, "secret"), "rb") as f:
            if f.read() != SECRET:
                raise InvariantError("the sentinel secret was modified")

    def check_refused(self) -> None:
        """After a refusal the destination is gone."""
        if os.path.lexists(self.dest):
            raise InvariantError("a refused input left its destination behind")

    def check_tree(self, max_bytes: int) -> None:
        """The destination holds only dirs, regular files (no setuid/setgid, at most
        ``max_bytes`` of data) and symlinks that resolve inside it."""
        check_tree(self.dest, max_bytes)

    def remove_dest(self) -> None:
        """Remove the destination, whatever it holds."""
        remove_tree(self.dest)


def check_tree(dest: str, max_bytes: int) -> None:
    """The tree at ``dest`` holds only what a workspace may (see the module docstring)."""
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
        if total > max_bytes:
            raise InvariantError(f"{total} bytes of files extracted, above {max_bytes}")
    finally:
        os.close(root_fd)
