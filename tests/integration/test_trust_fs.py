"""Whatever a run plants in CACHE_DIR, no forgespace command touches anything outside it.

The attacks are real: internal directories replaced by symlinks to a directory outside the
cache holding sentinel files, lock files replaced by symlinks and hard links to an outside file,
trees deeper than PATH_MAX (as archives and as trees a run makes in its workspace), mode-000
trees (as root and as uid 65534), a mount point inside a run's workspace. Every command that
touches them runs (get in three modes, cleanup, gc, evict, verify); the sentinels must survive
byte for byte and the planted entry must be refused or reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from support.nobody import run_as_nobody
from support.procs import make_project

from forgespace import ForgespaceError, Settings, WorkspaceCache, open_store
from forgespace.cache.eviction import evict_target
from forgespace.cli.cache_cmds import verify_doc
from forgespace.errors import UnsafeCacheEntryError

SRC = Path(__file__).resolve().parents[2] / "src"


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root``: kind, mode and content digest (symlinks by target)."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = f"dir {st.st_mode:o}"
            else:
                out[rel] = f"file {st.st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def _outside(tmp_path: Path, tid: str) -> Path:
    """A directory outside CACHE_DIR shaped like what each sweep would delete or write."""
    out = tmp_path / "outside"
    for rel in (
        "keep.txt",  # anything in the trash is deleted
        f"{tid}/r-old/keep.txt",  # overlay upper dirs of a run
        f"{tid}~run-x~1-deadbeef0000~abcd1234/keep.txt",  # a dead process's staging dir
        "1-deadbeef0000.lock",  # a dead owner's lock file
        f"{tid}.lock",  # a lock file: truncated and written by an exclusive holder
        f"{tid}.shared.stamp",  # a manifest record
    ):
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"sentinel {rel}\n")
    return out


def _attempt(what: str, fn: Callable[[], object], errors: dict[str, str]) -> None:
    """Run one command; a ForgespaceError (a refusal) is an allowed outcome, anything else
    (a traceback a user would see) is not."""
    try:
        fn()
    except ForgespaceError as exc:
        errors[what] = str(exc)


@pytest.fixture
def target(settings: Settings, tmp_path: Path) -> str:
    return open_store(settings).upload_target(make_project(tmp_path / "proj", files=12))


def _every_command(cache: WorkspaceCache, tid: str, errors: dict[str, str]) -> None:
    _attempt("get shared", lambda: cache.get_target(tid, "s1", "shared"), errors)
    _attempt("get isolated", lambda: cache.get_target(tid, "i2", "isolated"), errors)
    _attempt("get copy-on-write", lambda: cache.get_target(tid, "c2", "copy-on-write"), errors)
    root = cache.layout.root
    _attempt("cleanup isolated", lambda: cache.cleanup_cache(root / tid / "i1", "isolated"), errors)
    _attempt(
        "cleanup copy-on-write",
        lambda: cache.cleanup_cache(root / tid / "c1", "copy-on-write"),
        errors,
    )
    _attempt("sweep", cache.sweep_leftovers, errors)
    _attempt("gc", cache.gc, errors)
    _attempt("evict", lambda: evict_target(cache, tid, force=True), errors)


@pytest.mark.parametrize(
    "name", ["trash", "tmp", "locks", "owners", "manifests", "overlay", "blobs"]
)
def test_planted_internal_directory_is_refused_never_followed(
    settings: Settings, tmp_path: Path, target: str, name: str
) -> None:
    cache = WorkspaceCache(settings)
    cache.get_target(target, "i1", "isolated")
    cache.get_target(target, "c1", "copy-on-write")
    cache.get_target(target, None, "shared")
    outside = _outside(tmp_path, target)
    before = _snapshot(outside)
    planted = cache.layout.meta_dir / name
    if planted.exists():
        shutil.rmtree(planted)
    planted.symlink_to(outside)

    errors: dict[str, str] = {}
    cache = WorkspaceCache(settings)  # a fresh process would meet it at start-up too
    _every_command(cache, target, errors)
    doc = verify_doc(cache, repair=False)

    assert _snapshot(outside) == before, f"something outside CACHE_DIR changed ({errors})"
    assert planted.is_symlink(), "the planted link itself is left for the operator"
    assert doc["ok"] is False
    assert any(line.startswith(f"{planted}: a symbolic link") for line in doc["unsafe"]), doc
    # Every refusal names the planted entry.
    for what, msg in errors.items():
        assert str(planted) in msg, (what, msg)


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_planted_lock_file_is_refused_and_never_written(
    settings: Settings, tmp_path: Path, target: str, how: str
) -> None:
    cache = WorkspaceCache(settings)
    outside = _outside(tmp_path, target)
    victim = outside / f"{target}.lock"
    before = _snapshot(outside)
    lock = cache.layout.lock_path(target)
    lock.unlink(missing_ok=True)
    if how == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)

    errors: dict[str, str] = {}
    _every_command(cache, target, errors)
    doc = verify_doc(cache, repair=False)

    assert _snapshot(outside) == before
    assert victim.read_text() == f"sentinel {target}.lock\n"
    # The engine's lock users refuse, naming the lock file; gc and sweep go on around it.
    for what in ("get shared", "get isolated", "get copy-on-write", "evict"):
        assert str(lock) in errors.get(what, ""), (what, errors)
    assert "gc" not in errors and "sweep" not in errors
    assert any(line.startswith(str(lock)) for line in doc["unsafe"]), doc


def test_vanished_lock_file_is_recreated(settings: Settings, target: str) -> None:
    cache = WorkspaceCache(settings)
    cache.get_target(target, None, "shared")
    shutil.rmtree(cache.layout.locks_dir)  # a run deleted the whole locks directory
    assert Path(cache.get_target(target, "r2", "isolated")).is_dir()
    assert cache.layout.lock_path(target).is_file()


def _deep_tar(path: Path, depth: int, *, root_mode: int = 0o755) -> None:
    """A PAX tar whose one file is ``depth`` directories deep (beyond PATH_MAX at 2,040)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(".")
        ti.type, ti.mode = tarfile.DIRTYPE, root_mode
        tf.addfile(ti)
        data = b"deep\n"
        ti = tarfile.TarInfo("/".join(["d"] * depth) + "/leaf.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))


def _read_deep(ws: Path, depth: int) -> bytes:
    """The leaf of a deep tree, reached one directory fd at a time (no long path)."""
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf.txt", os.O_RDONLY, dir_fd=fd)
        with open(leaf, "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _make_deep(ws: Path, depth: int) -> None:
    """What a run may do in its own workspace: a chain of ``depth`` directories."""
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("x", dir_fd=fd)
            nfd = os.open("x", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _assert_nothing_left(cache: WorkspaceCache, tid: str) -> None:
    assert os.listdir(cache.layout.trash_dir) == []
    assert [n for n in os.listdir(cache.layout.tmp_dir) if n.startswith(tid)] == []


@pytest.mark.parametrize("depth", [1200, 2040])
def test_deep_trees_through_get_cleanup_evict_gc(
    settings: Settings, tmp_path: Path, depth: int
) -> None:
    tar = tmp_path / "deep.tar"
    _deep_tar(tar, depth)
    tid = open_store(settings).upload_target(tar)
    cache = WorkspaceCache(settings)
    iso = Path(cache.get_target(tid, "i1", "isolated"))
    shared = Path(cache.get_target(tid, None, "shared"))
    cow = Path(cache.get_target(tid, "c1", "copy-on-write"))
    for ws in (iso, shared, cow):
        assert _read_deep(ws, depth) == b"deep\n"

    # Runs make deep trees of their own, beyond PATH_MAX as absolute paths.
    _make_deep(iso, depth)
    _make_deep(cow, depth)
    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    assert not iso.parent.exists() and not cow.parent.exists()
    _assert_nothing_left(cache, tid)

    # A run that ended without cleanup: its lease ends, gc removes the orphan.
    orphan = Path(cache.get_target(tid, "c2", "copy-on-write"))
    _make_deep(orphan, depth)
    cache.index.end_lease(f"{tid}/c2")
    report = cache.gc()
    assert not report.skipped, report.skipped
    assert not orphan.parent.exists()
    _assert_nothing_left(cache, tid)

    evicted = evict_target(cache, tid, force=True)
    assert evicted and not cache.layout.target_dir(tid).exists()
    _assert_nothing_left(cache, tid)
    # The deep tree left in the trash by a crash goes with the next gc, too.
    trash_tree = cache.layout.trash_dir / "left"
    trash_tree.mkdir()
    _make_deep(trash_tree, depth)
    cache.gc()
    _assert_nothing_left(cache, tid)


# The same scenario as root and as uid 65534 (a worker that is not root: modes then bind).
_MODE000 = r"""
import io, json, os, sys, tarfile
from pathlib import Path
from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache.eviction import evict_target

base = Path(sys.argv[1])
settings = Settings.from_env({"CACHE_DIR": str(base / "cache"), "STORAGE_DIR": str(base / "store")})
tar = base / "zero.tar"
with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
    for name, mode in ((".", 0o000), ("sub", 0o000)):
        ti = tarfile.TarInfo(name); ti.type, ti.mode = tarfile.DIRTYPE, mode; tf.addfile(ti)
    ti = tarfile.TarInfo("sub/f.txt"); ti.size, ti.mode = 2, 0o000
    tf.addfile(ti, io.BytesIO(b"hi"))
tid = open_store(settings).upload_target(tar)
cache = WorkspaceCache(settings)
out = {}
iso = Path(cache.get_target(tid, "i1", "isolated"))
out["iso_mode"] = oct(os.stat(iso).st_mode & 0o777)
cache.cleanup_cache(iso, "isolated")
out["iso_gone"] = not iso.parent.exists()

def chmod_000(ws):
    for dirpath, dirs, files in os.walk(ws, topdown=False):
        for n in files + dirs:
            os.chmod(os.path.join(dirpath, n), 0)
    os.chmod(ws, 0)

cow = Path(cache.get_target(tid, "c1", "copy-on-write"))
(cow / "made-by-run").mkdir()
chmod_000(cow)
cache.cleanup_cache(cow, "copy-on-write")
out["cow_gone"] = not cow.parent.exists()

orphan = Path(cache.get_target(tid, "c2", "copy-on-write"))
chmod_000(orphan)
cache.index.end_lease(f"{tid}/c2")
report = cache.gc()
out["gc_skipped"] = [s.why for s in report.skipped]
out["orphan_gone"] = not orphan.parent.exists()

iso2 = Path(cache.get_target(tid, "i2", "isolated"))
chmod_000(iso2)
evict_target(cache, tid, force=True)
out["evicted"] = not cache.layout.target_dir(tid).exists()
out["trash"] = os.listdir(cache.layout.trash_dir)
print(json.dumps(out))
"""


def _check_mode000(out: dict[str, object]) -> None:
    assert out == {
        "iso_mode": "0o0",
        "iso_gone": True,
        "cow_gone": True,
        "gc_skipped": [],
        "orphan_gone": True,
        "evicted": True,
        "trash": [],
    }


def test_mode_000_trees_as_root(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _MODE000, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert r.returncode == 0, r.stderr
    _check_mode000(json.loads(r.stdout.strip().splitlines()[-1]))


def test_mode_000_trees_as_unprivileged_user(nobody_dir: Path) -> None:
    r = run_as_nobody(_MODE000.replace("sys.argv[1]", repr(str(nobody_dir))), cwd=nobody_dir)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    _check_mode000(json.loads(r.stdout.strip().splitlines()[-1]))


def test_planted_symlinks_as_unprivileged_user(nobody_dir: Path) -> None:
    """The trash/tmp attack by a run as the worker's own (non-root) user."""
    outside = nobody_dir / "outside"
    snippet = rf"""
import os, json
from pathlib import Path
from forgespace import Settings, WorkspaceCache, open_store, ForgespaceError
base = Path({str(nobody_dir)!r})
outside = base / "outside"
(outside / "sub").mkdir(parents=True)
(outside / "keep.txt").write_text("keep")
(outside / "sub" / "keep.txt").write_text("keep")
settings = Settings.from_env(
    {{"CACHE_DIR": str(base / "cache"), "STORAGE_DIR": str(base / "store")}}
)
proj = base / "proj"; proj.mkdir(); (proj / "a.txt").write_text("a")
tid = open_store(settings).upload_target(proj)
cache = WorkspaceCache(settings)
cache.get_target(tid, "r1", "isolated")
os.rename(cache.layout.trash_dir, base / "old-trash")
os.symlink(outside, cache.layout.trash_dir)
errors = []
for fn in (cache.gc, cache.sweep_leftovers,
           lambda: cache.cleanup_cache(cache.layout.run_dir(tid, "r1"), "isolated")):
    try:
        fn()
    except ForgespaceError as exc:
        errors.append(str(exc))
print(json.dumps(errors))
"""
    r = run_as_nobody(snippet, cwd=nobody_dir)
    assert r.returncode == 0, r.stderr
    assert (outside / "keep.txt").read_text() == "keep"
    assert (outside / "sub" / "keep.txt").read_text() == "keep"
    assert sorted(os.listdir(outside)) == ["keep.txt", "sub"]


def test_mount_point_inside_a_run_is_never_crossed(
    settings: Settings, tmp_path: Path, target: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cache = WorkspaceCache(settings)
    ws = Path(cache.get_target(target, "r1", "isolated"))
    mnt = ws / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"tmpfs mount refused: {r.stderr.strip()}")
    try:
        (mnt / "keep.txt").write_text("keep")
        with pytest.raises(UnsafeCacheEntryError, match="mount point"):
            cache.cleanup_cache(ws, "isolated")
        # The run directory left the cache's view (it is in the trash); the mount's content
        # is untouched wherever it now is.
        kept = [p for p in cache.layout.trash_dir.rglob("keep.txt")]
        assert [p.read_text() for p in kept] == ["keep"]
        assert not ws.parent.exists()
        doc = cache.gc()
        assert any("mount point" in s.why for s in doc.skipped), doc.skipped
        assert [p.read_text() for p in cache.layout.trash_dir.rglob("keep.txt")] == ["keep"]
    finally:
        for p in [mnt, *cache.layout.trash_dir.rglob("mnt")]:
            subprocess.run(["umount", str(p)], capture_output=True)
    cache.gc()
    assert os.listdir(cache.layout.trash_dir) == []


def test_gc_unmounts_only_the_overlays_it_makes(settings: Settings, target: str) -> None:
    """gc unmounts the overlay mounts forgespace makes in runs no live lease holds; another
    filesystem mounted in a run directory (an operator's) is neither planned nor unmounted,
    as the deletion never crosses it either."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cache = WorkspaceCache(settings)
    cache.get_target(target, "r1", "isolated")
    # a directory gc neither evicts (not a run id) nor sees leased: its mounts are planned
    # on their own
    mnt = settings.cache_dir / target / "not a run id" / "mnt"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"tmpfs mount refused: {r.stderr.strip()}")
    try:
        (mnt / "keep.txt").write_text("keep")
        assert [p for p in cache.gc(dry_run=True).plan if p.target_id == target] == []
        doc = cache.gc()
        assert [e for e in doc.evicted if e.target_id == target] == []
        assert os.path.ismount(mnt) and (mnt / "keep.txt").read_text() == "keep"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_planted_index_file_link_is_removed_not_written_through(
    settings: Settings, tmp_path: Path, target: str, suffix: str
) -> None:
    """SQLite opens the index and its WAL/shm by path: a link planted under one of those names
    would make every process write outside CACHE_DIR. The link is removed, never followed."""
    cache = WorkspaceCache(settings)
    cache.get_target(target, "i1", "isolated")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.db"
    victim.write_bytes(b"not yours\n" * 100)
    before = _snapshot(outside)
    index = cache.layout.meta_dir / f"index.sqlite{suffix}"
    cache.index.close()
    index.unlink(missing_ok=True)
    index.symlink_to(victim)

    errors: dict[str, str] = {}
    fresh = WorkspaceCache(settings)
    _every_command(fresh, target, errors)
    fresh.index.summary()

    assert _snapshot(outside) == before, f"the index wrote through a planted link ({errors})"
    assert not index.is_symlink()
    assert fresh.index.live_leases() is not None  # the index works again


@pytest.mark.parametrize("mode", ["isolated", "shared", "copy-on-write"])
def test_staging_swapped_mid_get_cannot_redirect_writes(
    settings: Settings, tmp_path: Path, target: str, mode: str
) -> None:
    """A run that, while a download is being staged, moves `.forgespace/tmp` away, plants a
    directory of the staging dir's name outside CACHE_DIR and points `tmp` at it: the rest of
    the staging (extraction, copy) must still land in the directory forgespace made, never
    outside. Staging is written through /proc/self/fd/N, pinned when it was made."""
    from forgespace.cache.hooks import Phase

    outside = tmp_path / "outside"
    outside.mkdir()

    class SwapTmp:
        done = False

        def reached(self, phase: Phase) -> None:
            if phase is not Phase.DOWNLOADED or self.done:
                return
            self.done = True
            tmp = settings.cache_dir / ".forgespace" / "tmp"
            for stage in os.listdir(tmp):  # the attacker sees the staging dir's name...
                (outside / stage).mkdir()
                # ...and offers a copy of the download there, so reading it would succeed
                shutil.copyfile(tmp / stage / "target", outside / stage / "target")
            tmp.rename(tmp.with_name("tmp.moved"))
            tmp.symlink_to(outside)

    hooks = SwapTmp()
    cache = WorkspaceCache(settings, hooks=hooks)
    errors: dict[str, str] = {}
    _attempt("get", lambda: cache.get_target(target, "r1", mode), errors)
    assert hooks.done
    written = [p for p in outside.rglob("*") if not p.is_dir() and p.name != "target"]
    assert written == [], f"staging was redirected outside CACHE_DIR: {written} ({errors})"
    if not errors:  # served: the workspace is the one forgespace built, complete
        ws = Path(cache.get_target(target, "r1", mode))
        assert (ws / "run.sh").is_file()
