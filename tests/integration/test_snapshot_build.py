"""A new version of a manifest target built from a snapshot of a sealed earlier tree (btrfs):
byte for byte what a full build gives, never from a tree a run tampered with (the attacks
themselves), across processes, and removed by gc like any entry (as root and as nobody)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mounts import MountRefused, loop_btrfs
from support.nobody import NOBODY, run_as_nobody
from support.procs import make_project, run_getters, start_role, wait_for

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache import snapshot
from forgespace.cache.eviction import evict_target
from forgespace.cache.manifest import seal_path
from forgespace.errors import UnsafeArchiveError
from forgespace.storage.manifest import Manifest, encode_manifest, parse_manifest
from forgespace.storage.pack import tree_usage

pytestmark = [pytest.mark.integration, pytest.mark.btrfs]

SNAPPED = "built from a snapshot of"
REFUSED = "building from blobs"


def _v1(root: Path) -> Path:
    make_project(root, files=80, size=3000, seed="v1")
    (root / "gone" / "deep").mkdir(parents=True)
    (root / "gone" / "deep" / "x.txt").write_text("removed in v2")
    (root / "becomes_dir").write_text("a file in v1, a directory in v2")
    os.symlink("pkg0/sub0/f0.py", root / "link.py")
    (root / "tool.sh").write_text("#!/bin/sh\n")
    return root


def _v2(v1: Path, root: Path) -> Path:
    shutil.copytree(v1, root, symlinks=True)
    (root / "pkg1" / "sub1" / "f1.py").write_text("changed in v2")
    (root / "pkg2" / "sub2" / "f2.py").unlink()
    shutil.rmtree(root / "gone")
    (root / "becomes_dir").unlink()
    (root / "becomes_dir").mkdir()
    (root / "becomes_dir" / "inside.txt").write_text("new")
    (root / "new" / "nested").mkdir(parents=True)
    (root / "new" / "nested" / "n.txt").write_text("added in v2")
    os.unlink(root / "link.py")
    os.symlink("pkg1/sub1/f1.py", root / "link.py")
    os.chmod(root / "tool.sh", 0o755)  # only the executable bit changes
    return root


def _listing(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a user can observe of a tree: kind, mode, size, mtime, content or target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    out["."] = ("d", stat.S_IMODE(root.lstat().st_mode))
    return out


@pytest.fixture
def world(btrfs_dir: Path, tmp_path: Path) -> dict[str, object]:
    """A cache and a store on the btrfs mount, v1 and v2 uploaded (manifest targets)."""
    base = Path(tempfile.mkdtemp(prefix="snap-", dir=btrfs_dir))
    env = {"CACHE_DIR": str(base / "cache"), "STORAGE_DIR": str(base / "store")}
    settings = Settings.from_env(env)
    store = open_store(settings)
    v1 = _v1(tmp_path / "v1")
    v2 = _v2(v1, tmp_path / "v2")
    return {
        "base": base,
        "env": env,
        "settings": settings,
        "store": store,
        "t1": store.upload_target(v1),
        "t2": store.upload_target(v2),
    }


def _full_build(world: dict[str, object], tid: str, mode: str) -> dict[str, tuple[object, ...]]:
    """The read-only tree a fresh cache (no earlier version) builds for ``tid``."""
    env = dict(world["env"], CACHE_DIR=str(Path(world["base"]) / "fresh"))  # type: ignore[arg-type]
    cache = WorkspaceCache(Settings.from_env(env), store=world["store"])  # type: ignore[arg-type]
    cache.get_target(tid, "ref", mode)
    return _listing(_pristine(cache, tid, mode))


def _pristine(cache: WorkspaceCache, tid: str, mode: str) -> Path:
    if mode == "copy-on-write":
        return cache.layout.cow_shared_workspace(tid)
    return cache.layout.shared_workspace(tid)


@pytest.mark.parametrize("mode", ["shared", "copy-on-write"])
def test_a_new_version_from_a_snapshot_is_exactly_the_full_build(
    world: dict[str, object], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    w1 = Path(cache.get_target(t1, "r1", mode))
    before = _listing(w1)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    w2 = Path(cache.get_target(t2, "r2", mode))
    assert any(SNAPPED in r.getMessage() for r in caplog.records), caplog.text
    pristine = _pristine(cache, t2, mode)
    assert pristine.stat().st_ino == snapshot.SUBVOL_ROOT_INO  # a subvolume: the next base
    got = _listing(pristine)
    assert got == _full_build(world, t2, mode)
    assert "gone" not in got and "pkg2/sub2/f2.py" not in got
    assert got["tool.sh"][1] == 0o555 and got["becomes_dir"][0] == "d"
    assert got["link.py"][1] == "pkg1/sub1/f1.py"
    assert _listing(w1) == before  # the base is untouched
    if mode == "copy-on-write":  # the run's own copy is writable and has the new content
        assert (w2 / "pkg1" / "sub1" / "f1.py").read_text() == "changed in v2"
        (w2 / "pkg1" / "sub1" / "f1.py").write_text("run writes")
    assert (pristine / "pkg1" / "sub1" / "f1.py").read_text() == "changed in v2"
    # Its seal's sketch (which a later version's choice of base reads) is its own files'.
    kind = "cow" if mode == "copy-on-write" else "shared"
    sealed = (cache.layout.meta_dir / "manifests" / f"{t2}.{kind}.seal").read_bytes()
    files = [e[6] for e in snapshot.SealRecord.decode(sealed).entries.values() if e[0] == "f"]
    assert json.loads(sealed.partition(b"\n")[0])["sketch"] == snapshot._sketch(files)


def _writable(p: Path) -> None:
    os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _modify_file(ws: Path, outside: Path) -> None:
    f = ws / "pkg3" / "sub0" / "f3.py"
    _writable(f)
    f.write_bytes(b"x" * f.stat().st_size)  # same size: only ctime (and content) tell
    os.chmod(f, 0o444)


def _plant_symlink(ws: Path, outside: Path) -> None:
    d = ws / "pkg3" / "sub0"
    _writable(d)
    os.symlink(str(outside), d / "evil")
    os.chmod(d, 0o555)


def _swap_directory(ws: Path, outside: Path) -> None:
    # pkg4 replaced by a symlink to a directory outside the cache (the same file names)
    _writable(ws)
    os.rename(ws / "pkg4", ws / ".old-pkg4")
    shutil.rmtree(outside)
    outside.mkdir()
    os.symlink(str(outside), ws / "pkg4")
    os.chmod(ws, 0o555)


def _replace_workspace(ws: Path, outside: Path) -> None:
    # the whole tree replaced by a symlink to an outside copy of it
    shutil.copytree(ws, outside, symlinks=True, dirs_exist_ok=True)
    os.rename(ws, ws.parent / "old-workspace")
    os.symlink(str(outside), ws)


def _own_subvolume(ws: Path, outside: Path) -> None:
    # a subvolume the attacker made (a snapshot of the real tree, then modified) put in place
    pfd = os.open(ws.parent, os.O_RDONLY | os.O_DIRECTORY)
    src = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        snapshot.snapshot_into(src, pfd, "forged")
    finally:
        os.close(src)
        os.close(pfd)
    forged = ws.parent / "forged"
    _writable(forged / "pkg3" / "sub0")
    os.symlink(str(outside), forged / "pkg3" / "sub0" / "evil")
    os.rename(ws, ws.parent / "old-workspace")
    os.rename(forged, ws)


ATTACKS: dict[str, Callable[[Path, Path], None]] = {
    "modified-file": _modify_file,
    "planted-symlink": _plant_symlink,
    "swapped-directory": _swap_directory,
    "replaced-workspace": _replace_workspace,
    "forged-subvolume": _own_subvolume,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_tampered_base_is_never_used(
    world: dict[str, object], attack: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    ws = Path(cache.get_target(t1, None, "shared"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("never touched")
    ATTACKS[attack](ws, outside)
    outside_before = _listing(outside)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    w2 = Path(cache.get_target(t2, None, "shared"))
    messages = [r.getMessage() for r in caplog.records]
    assert not any(SNAPPED in m for m in messages), messages
    assert any(REFUSED in m for m in messages), messages  # the fallback is logged
    assert _listing(w2) == _full_build(world, t2, "shared")
    assert _listing(outside) == outside_before  # nothing outside CACHE_DIR touched


def test_an_untampered_base_is_verified_not_trusted_by_name(
    world: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """A seal rewritten to name another subvolume's uuid is refused (the snapshot's parent
    uuid is checked), and the next get still works from a full build."""
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    cache.get_target(t1, None, "shared")
    sp = seal_path(cache.layout.meta_dir, t1, "shared")
    head, _, body = sp.read_bytes().partition(b"\n")
    doc = json.loads(head)
    doc["uuid"] = "0" * 32
    forged = sp.with_name("forged")  # a new file: this process remembers the seal it wrote
    forged.write_bytes(json.dumps(doc).encode() + b"\n" + body)
    forged.rename(sp)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    w2 = Path(cache.get_target(t2, None, "shared"))
    assert not any(SNAPPED in r.getMessage() for r in caplog.records)
    assert _listing(w2) == _full_build(world, t2, "shared")


def test_a_worker_reads_a_seal_once_and_again_when_it_is_replaced(
    world: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seal a worker wrote (or read) is not decoded again for the next version (~50 ms
    of a 20,000-file tree's get); a seal file replaced since is read anew."""
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    decoded: list[int] = []
    real = snapshot.SealRecord.decode.__func__  # type: ignore[attr-defined]

    def counting(cls: type[snapshot.SealRecord], data: bytes) -> snapshot.SealRecord:
        decoded.append(len(data))
        return real(cls, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(snapshot.SealRecord, "decode", classmethod(counting))
    cache.get_target(t1, None, "shared")
    w2 = cache.get_target(t2, None, "shared")
    assert decoded == []  # v1's seal, as this process wrote it
    assert _listing(Path(w2)) == _full_build(world, t2, "shared")
    # v2's seal file replaced by a copy of itself (another file): read and decoded again.
    sp = seal_path(cache.layout.meta_dir, t2, "shared")
    copy = sp.with_name("copy")
    shutil.copyfile(sp, copy)
    copy.rename(sp)
    v3 = tmp_path / "v3"
    shutil.copytree(tmp_path / "v2", v3, symlinks=True)  # the fixture's v2 source
    (v3 / "pkg1" / "sub1" / "f1.py").write_text("changed in v3")
    t3 = world["store"].upload_target(v3)  # type: ignore[attr-defined]
    evict_target(cache, t1)  # v2 is the only base left
    w3 = cache.get_target(t3, None, "shared")
    assert decoded == [sp.stat().st_size]
    assert (Path(w3) / "pkg1" / "sub1" / "f1.py").read_text() == "changed in v3"
    assert _listing(Path(w3)) == _full_build(world, t3, "shared")


def test_concurrent_processes_build_the_new_version_once(
    world: dict[str, object], tmp_path: Path
) -> None:
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    cache.get_target(t1, None, "shared")
    env = {**os.environ, **world["env"]}  # type: ignore[dict-item]
    results = run_getters(env, [(t2, f"r{i}", "shared") for i in range(4)], tmp_path)
    assert len({json.dumps(r["digest"], sort_keys=True) for r in results}) == 1
    assert sum(SNAPPED in str(r["stderr"]) for r in results) <= 1
    assert sum(bool(r["downloaded"]) for r in results) == 1
    w2 = cache.layout.shared_workspace(t2)
    assert w2.stat().st_ino == snapshot.SUBVOL_ROOT_INO
    assert _listing(w2) == _full_build(world, t2, "shared")


def test_gc_removes_snapshot_built_entries_and_their_seals(world: dict[str, object]) -> None:
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    for tid in (t1, t2):
        cache.get_target(tid, None, "shared")
        cache.get_target(tid, "run", "copy-on-write")
    assert not cache.audit_internal()  # subvolumes are not reported as mount points
    # sizes (index rebuild, eviction) enter a subvolume: same mount, its own st_dev
    shared_dir = cache.layout.cow_shared_dir(t2)
    files = [p for p in shared_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert tree_usage(shared_dir, one_filesystem=True) == (
        sum(p.stat().st_size for p in files),
        len(files),
    )
    for tid in (t1, t2):
        for kind in ("shared", "cow"):
            assert seal_path(cache.layout.meta_dir, tid, kind).exists()
    for tid in (t1, t2):
        cache.cleanup_cache(str(cache.layout.run_workspace(tid, "run")), "copy-on-write")
        evict_target(cache, tid)
        assert not cache.layout.target_dir(tid).exists()
        for kind in ("shared", "cow"):
            assert not seal_path(cache.layout.meta_dir, tid, kind).exists()
    trash = cache.layout.meta_dir / "trash"
    assert not trash.exists() or not os.listdir(trash)
    out = subprocess.run(
        ["btrfs", "subvolume", "list", "-o", str(Path(world["base"]))],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
    )
    if out.returncode == 0:
        mine = f"{Path(world['base']).name}/cache/"  # type: ignore[arg-type]
        assert mine not in out.stdout, out.stdout  # no subvolume of this cache is left


@pytest.fixture
def nobody_btrfs() -> Iterator[Path]:
    """A btrfs loop mount whose path the unprivileged user can traverse (the session's
    ``btrfs_dir`` lives under pytest's 0700 directory); a directory on it owned by nobody."""
    work = Path(tempfile.mkdtemp(prefix="forgespace-nobody-btrfs-"))
    os.chmod(work, 0o711)
    try:
        with loop_btrfs(work / "fs", size=512 << 20) as mnt:
            os.chmod(mnt, 0o711)
            base = mnt / "w"
            base.mkdir()
            os.chown(base, NOBODY, NOBODY)
            yield base
    except MountRefused as e:
        pytest.skip(f"btrfs loop mount unavailable: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_an_unprivileged_worker_builds_from_snapshots_and_gc_removes_them(
    nobody_btrfs: Path, nobody_dir: Path
) -> None:
    base = nobody_btrfs
    v1 = _v1(nobody_dir / "v1")
    _v2(v1, nobody_dir / "v2")
    for dirpath, dirs, files in os.walk(nobody_dir):
        for n in [*dirs, *files]:
            os.chown(Path(dirpath) / n, NOBODY, NOBODY, follow_symlinks=False)
    snippet = textwrap.dedent(
        f"""
        import json, logging, os, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from forgespace import Settings, WorkspaceCache, open_store
        from forgespace.cache.eviction import evict_target
        s = Settings.from_env({{"CACHE_DIR": {str(base / "cache")!r},
                                "STORAGE_DIR": {str(base / "store")!r}}})
        store = open_store(s)
        t1 = store.upload_target({str(nobody_dir / "v1")!r})
        t2 = store.upload_target({str(nobody_dir / "v2")!r})
        c = WorkspaceCache(s, store=store)
        c.get_target(t1, None, "shared")
        w2 = c.get_target(t2, None, "shared")
        ino = os.stat(w2).st_ino
        evict_target(c, t1)
        evict_target(c, t2)
        left = os.listdir({str(base / "cache")!r})
        print(json.dumps({{"ino": ino, "left": sorted(left), "problems": c.audit_internal()}}))
        """
    )
    r = run_as_nobody(snippet, cwd=nobody_dir, env={"PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert SNAPPED in r.stderr, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ino"] == snapshot.SUBVOL_ROOT_INO
    assert got["left"] == [".forgespace"] and got["problems"] == []
    trash = base / "cache" / ".forgespace" / "trash"
    assert not trash.exists() or not os.listdir(trash)


@pytest.mark.parametrize(
    "case", ["escaping-link", "absolute-link", "link-chain", "write-through-link"]
)
def test_a_hostile_new_version_is_refused_on_the_snapshot_path_too(
    world: dict[str, object], tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest is untrusted input: the diff applies the archive rules (links checked
    through the kept ones too); the refused build leaves nothing, the base is untouched."""
    store: Any = world["store"]
    cache = WorkspaceCache(world["settings"], store=store)  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    w1 = Path(cache.get_target(t1, None, "shared"))
    before = _listing(w1)
    store.download_target(t2, tmp_path / "v2.manifest")
    m = parse_manifest((tmp_path / "v2.manifest").read_bytes(), t2)
    held = m.files[0]  # a blob the host holds: only the build can refuse
    extra: tuple[Any, ...] = {
        "escaping-link": (("l", "out", "../../.."),),
        "absolute-link": (("l", "abs", "/etc/passwd"),),
        "link-chain": (("l", "pkg0/up", ".."), ("l", "chain", "pkg0/up/..")),  # via a kept dir
        "write-through-link": (("l", "x", "pkg1"), dataclasses.replace(held, path="x/new.py")),
    }[case]
    (tmp_path / "hostile").write_bytes(encode_manifest(Manifest("x", (*m.entries, *extra))))
    bad = str(store.upload_target(tmp_path / "hostile"))
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    with pytest.raises(UnsafeArchiveError):
        cache.get_target(bad, None, "shared")
    # A parent that is not a directory of the manifest is left to the full build's rules.
    diffed = case != "write-through-link"
    assert diffed == any("snapshot base" in r.getMessage() for r in caplog.records), caplog.text
    assert not cache.layout.shared_workspace(bad).exists()
    tmp = cache.layout.meta_dir / "tmp"
    assert not tmp.exists() or not [p for p in tmp.rglob("*") if p.name == "workspace"]
    assert _listing(w1) == before
    assert not (Path(world["base"]) / "out").exists()  # type: ignore[arg-type]


def test_sigkill_during_a_snapshot_build_leaves_nothing_a_later_get_returns(
    world: dict[str, object], tmp_path: Path
) -> None:
    """Killed while its snapshot waits for a blob: the next get sweeps the staged snapshot
    (a subvolume) away, builds the version again and no subvolume of the dead build is left."""
    cache = WorkspaceCache(world["settings"], store=world["store"])  # type: ignore[arg-type]
    t1, t2 = str(world["t1"]), str(world["t2"])
    cache.get_target(t1, None, "shared")
    sig = tmp_path / "paused"
    env = {**os.environ, **world["env"]}  # type: ignore[dict-item]
    spec = {"target_id": t2, "mode": "shared", "pause": "blob-write", "signal": str(sig)}
    proc = start_role("incremental", "get", spec, env)
    staging = cache.layout.meta_dir / "tmp"
    try:
        wait_for(lambda: sig.exists() or proc.poll() is not None, 120, "the pause point")
        assert proc.poll() is None, proc.communicate()
        # the builder has its snapshot and waits for the blob being fetched
        wait_for(lambda: any(staging.rglob("workspace")), 30, "the staged snapshot")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    staged = next(staging.rglob("workspace"))
    assert staged.stat().st_ino == snapshot.SUBVOL_ROOT_INO
    assert not cache.layout.shared_workspace(t2).exists()
    w2 = Path(cache.get_target(t2, None, "shared"))
    assert _listing(w2) == _full_build(world, t2, "shared")
    assert not staged.exists()  # the dead build's snapshot was swept
    out = subprocess.run(
        ["btrfs", "subvolume", "list", str(Path(world["base"]))],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
    )
    if out.returncode == 0:
        mine = [ln for ln in out.stdout.splitlines() if f"{Path(world['base']).name}/" in ln]  # type: ignore[arg-type]
        assert not [ln for ln in mine if "/.forgespace/" in ln], mine
