"""Helpers shared by the bundled tools: heartbeat throttling, safe paths, file walking."""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from forgespace.sandbox import ToolProcess
from forgespace.sandbox import kill_tool as kill_group

#: A tool reports progress through this callback; activities pass ``activity.heartbeat``.
Heartbeat = Callable[[dict[str, Any]], None]

# Directories that never hold the target's own code: tool output and VCS/venv internals.
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".atheris"})


class ToolError(RuntimeError):
    """A bundled tool could not run (missing program, crash of the tool itself...)."""


class Throttle:
    """Calls ``heartbeat`` at most once per ``interval`` seconds (always when forced)."""

    def __init__(self, heartbeat: Heartbeat | None, interval: float = 1.0) -> None:
        self._heartbeat = heartbeat
        self._interval = interval
        self._last = 0.0

    def __call__(self, details: dict[str, Any], *, force: bool = False) -> None:
        if self._heartbeat is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            self._heartbeat(details)

    def lazy(self, make: Callable[[], dict[str, Any]]) -> None:
        """Like calling it, but builds the details only when a heartbeat is due."""
        if self._heartbeat is not None and time.monotonic() - self._last >= self._interval:
            self(make(), force=True)


def workspace_root(workspace: str | os.PathLike[str]) -> Path:
    """The workspace as an absolute path; it must exist (a directory or a single file)."""
    path = Path(workspace).absolute()
    if not path.exists():
        raise ValueError(f"workspace {str(path)!r} does not exist")
    return path


def resolve_inside(root: Path, relative: str, *, what: str) -> Path:
    """``root / relative``, checked to stay inside ``root`` (no ``..`` or absolute escape)."""
    candidate = (root / relative).resolve()
    base = root.resolve()
    if candidate != base and base not in candidate.parents:
        raise ValueError(f"{what} {relative!r} points outside the workspace")
    return candidate


def iter_files(root: Path, *, skip_dirs: frozenset[str] = SKIP_DIRS) -> Iterator[Path]:
    """Every regular file under ``root`` (or ``root`` itself when it is a file), sorted.

    Symlinks are not followed: a link could lead out of the workspace.
    """
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            p = Path(dirpath, name)
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield p


def relative_name(root: Path, path: Path) -> str:
    """``path`` relative to the workspace, POSIX style; the file name for a single-file target."""
    if root.is_file():
        return root.name
    return path.relative_to(root).as_posix()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mask(value: str) -> str:
    """Show at most the first two characters of a secret (none when it is short)."""
    return (value[:2] if len(value) >= 8 else "") + "****"


def fingerprint(value: str) -> str:
    """Short sha256 prefix: tells whether two findings are the same secret without showing it."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def tree_digest(root: str | os.PathLike[str]) -> str:
    """sha256 over every entry under ``root``: relative path, type, mode, size, mtime, content.

    Two equal digests mean the tree is byte-for-byte unchanged (used to check that a
    read-only scan of a shared workspace left it alone).
    """
    base = Path(root)
    h = hashlib.sha256()
    entries = [base] if base.is_file() else sorted(base.rglob("*"))
    for p in entries:
        st = p.lstat()
        rel = p.name if p == base else p.relative_to(base).as_posix()
        h.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def sandbox_note(tool: ToolProcess) -> str:
    """Said with a failed tool's error: what the sandbox withheld from it, if it had one."""
    if not tool.sandboxed:
        return ""
    return (
        " (it ran in the sandbox: no network, nothing but its workspace visible, "
        "/tmp private; see docs/deployment.md)"
    )


class _LineReader:
    """Reads a process's stdout in a daemon thread into a bounded queue (``None`` at EOF)."""

    def __init__(self, stdout: IO[bytes]) -> None:
        self.lines: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)
        self._stdout = stdout
        # Set when the caller stops listening (a callback raised): the reader then drains the
        # pipe to EOF without queueing, so it never blocks on a full queue nobody empties.
        self.abandoned = threading.Event()
        self.thread = threading.Thread(target=self._read, name="tool-output", daemon=True)
        self.thread.start()

    def _put(self, item: bytes | None) -> None:
        while not self.abandoned.is_set():
            try:
                self.lines.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        # The reader owns stdout and closes it itself: closed from another thread while it
        # still reads, readline would raise "readline of closed file" here.
        try:
            for raw in self._stdout:
                self._put(raw)
        finally:
            self._put(None)
            self._stdout.close()


def pump_lines(
    proc: subprocess.Popen[bytes],
    on_line: Callable[[str], None],
    on_tick: Callable[[], None],
    *,
    deadline: float,
    interval: float = 1.0,
) -> bool:
    """Feed each output line of ``proc`` to ``on_line`` and call ``on_tick`` at least every
    ``interval`` seconds, also while the process is silent (so heartbeats keep flowing).

    Kills the process group at the ``time.monotonic()`` ``deadline`` (returns True then) and
    whenever a callback raises (e.g. the activity was cancelled), so no tool outlives its call.
    """
    assert proc.stdout is not None
    reader = _LineReader(proc.stdout)
    timed_out = False
    try:
        while True:
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                kill_group(proc)
            try:
                item = reader.lines.get(timeout=interval)
            except queue.Empty:
                on_tick()
                continue
            if item is None:
                break
            on_line(item.decode("utf-8", "replace").rstrip("\r\n"))
            on_tick()
    except BaseException:
        reader.abandoned.set()
        kill_group(proc)
        raise
    finally:
        proc.wait()
        # The group is dead: EOF follows unless something outside it holds the pipe open
        # (then the daemon reader ends with that holder, closing stdout as it goes).
        reader.thread.join(timeout=5)
    return timed_out
