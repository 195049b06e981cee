"""Manifests of published shared workspaces, and the O(1) stamp checked on every hit.

A manifest lists (relative path, size, mtime_ns) of every regular file, taken from
``ExtractStats.manifest`` at publish (no extra walk). It lives under
``.forgespace/manifests/{target_id}.{kind}.json`` (kind ``shared`` or ``cow``) and is only
read by the full check (``WorkspaceCache.verify_shared``), never on a hit.

The stamp is the workspace root's (inode, mode, mtime_ns) recorded right after publish.
Comparing it costs one small read and a stat we already do: it catches a chmod of the
root or entries added/removed at the top level, not a file rewritten deep inside (that
needs the full walk: ~20k lstat calls for a 20k-file workspace, see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

from forgespace.cache import fsops

MANIFEST_VERSION = 1


def manifest_path(meta_dir: Path, target_id: str, kind: str) -> Path:
    return meta_dir / "manifests" / f"{target_id}.{kind}.json"


def stamp_path(meta_dir: Path, target_id: str, kind: str) -> Path:
    return meta_dir / "manifests" / f"{target_id}.{kind}.stamp"


def seal_path(meta_dir: Path, target_id: str, kind: str) -> Path:
    """The seal of a read-only tree built as a btrfs subvolume (cache/snapshot.py)."""
    return meta_dir / "manifests" / f"{target_id}.{kind}.seal"


# Records live in {CACHE_DIR}/.forgespace/manifests: reached through directory fds from
# CACHE_DIR, never through a planted link (fsops).
_IN_ROOT = (".forgespace", "manifests")


def _root_of(path: Path) -> Path:
    return path.parents[2]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fsops.write_atomic(_root_of(path), _IN_ROOT, path.name, data, tmp=tmp, mode=0o644)


def _read(path: str | Path) -> bytes:
    p = Path(path)
    with fsops.dir_fd(_root_of(p), _IN_ROOT) as d:
        fd = os.open(p.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    with open(fd, "rb") as f:
        return f.read()


def write_manifest(path: Path, files: Iterable[tuple[str, int, int]]) -> None:
    """Record the (path, size, mtime_ns) list atomically."""
    doc = {"version": MANIFEST_VERSION, "files": list(files)}  # tuples encode as lists
    _write_atomic(path, json.dumps(doc, separators=(",", ":")).encode())


def read_manifest(path: Path) -> dict[str, tuple[int, int]] | None:
    """path -> (size, mtime_ns), or None when there is no usable manifest."""
    try:
        doc = json.loads(_read(path))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        return None
    return {str(p): (int(s), int(m)) for p, s, m in doc.get("files", [])}


def stamp_of(st: os.stat_result) -> str:
    return f"{st.st_ino}:{stat.S_IMODE(st.st_mode):o}:{st.st_mtime_ns}"


def write_stamp(path: Path, workspace: Path) -> None:
    _write_atomic(path, stamp_of(os.stat(workspace)).encode())


def read_stamp(path: str | Path) -> str | None:
    try:
        return _read(path).decode("ascii").strip()
    except (OSError, ValueError):
        return None


def remove_records(meta_dir: Path, target_id: str, kind: str) -> None:
    """Forget the manifest, stamp and seal of an entry (eviction calls this after removing
    it)."""
    try:
        with fsops.dir_fd(meta_dir.parent, _IN_ROOT) as d:
            for p in (
                manifest_path(meta_dir, target_id, kind),
                stamp_path(meta_dir, target_id, kind),
                seal_path(meta_dir, target_id, kind),
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p.name, dir_fd=d)
    except FileNotFoundError:
        return


def compare_tree(root: Path, expected: dict[str, tuple[int, int]]) -> list[str]:
    """Differences between the tree at ``root`` and a manifest, plus anything writable.

    Each difference is one human-readable line: ``missing: p``, ``added: p``,
    ``modified: p (size a -> b)``, ``modified: p (mtime changed)``, ``writable: p``.
    """
    diffs: list[str] = []
    seen: set[str] = set()
    root_s = str(root)
    for dirpath, dirnames, filenames in os.walk(root_s):
        rel_dir = os.path.relpath(dirpath, root_s)
        dst = os.lstat(dirpath)
        if dst.st_mode & 0o222:
            diffs.append(f"writable: {'.' if rel_dir == '.' else rel_dir}/")
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                if not stat.S_ISLNK(st.st_mode):
                    diffs.append(f"added: {rel} (not a regular file)")
                continue
            seen.add(rel)
            want = expected.get(rel)
            if want is None:
                diffs.append(f"added: {rel}")
                continue
            if st.st_size != want[0]:
                diffs.append(f"modified: {rel} (size {want[0]} -> {st.st_size})")
            elif st.st_mtime_ns != want[1]:
                diffs.append(f"modified: {rel} (mtime changed)")
            if st.st_mode & 0o222:
                diffs.append(f"writable: {rel}")
    diffs.extend(f"missing: {rel}" for rel in sorted(set(expected) - seen))
    return diffs
