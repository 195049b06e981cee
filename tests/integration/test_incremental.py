"""Incremental targets (manifest + blob packs) through both stores and the worker's blob store:
only what changed is sent and fetched, bad manifests are refused, blobs are evicted by the
cache's rules, and uploads, downloads and prunes survive SIGKILL and each other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import make_project, run_getters, start_role, tree_digest, wait_for
from support.s3server import env_for

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache import blobstore
from forgespace.cache.eviction import evict_target
from forgespace.errors import IntegrityError, StorageError, TargetNotFoundError, UnsafeArchiveError
from forgespace.storage import blobs
from forgespace.storage.manifest import (
    MANIFEST_MAGIC,
    FileEntry,
    Manifest,
    encode_manifest,
    is_manifest,
    parse_manifest,
)
from forgespace.storage.pack import content_id

pytestmark = pytest.mark.integration
Env = Callable[[Settings], dict[str, str]]


def _project(root: Path, files: int = 60, seed: str = "p", size: int = 3000) -> Path:
    make_project(root, files=files, size=size, seed=seed)
    (root / "empty").mkdir()
    os.symlink("pkg0/sub0/f0.py", root / "link.py")
    return root


def _packs(store: Any) -> set[str]:
    return {k[len(blobs.PACKS) :] for k, _s, _m in store.blob_list(blobs.PACKS)[0]}


def _manifest(store: Any, tid: str, tmp: Path) -> Manifest:
    store.download_target(tid, tmp / f"{tid}.manifest")
    data = (tmp / f"{tid}.manifest").read_bytes()
    return parse_manifest(data, tid)


def _blob_names(settings: Settings) -> set[str]:
    return blobstore.held_digests(settings.cache_dir)


def _blob_bytes(settings: Settings) -> int:
    return sum(p.stat().st_size for p in (settings.cache_dir / ".forgespace" / "blobs").iterdir())


def _change_one(src: Path, dst: Path, n: int = 1) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    victims = sorted(dst.rglob("f*.py"))[:n]
    for v in victims:
        v.write_bytes(b"changed " + v.read_bytes())
    return dst


# --- transfer only what changed -----------------------------------------------------------
def test_second_version_sends_and_fetches_only_the_changed_file(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    settings = any_store_settings
    store: Any = open_store(settings)
    v1 = _project(tmp_path / "v1")
    tid1 = store.upload_target(v1)
    assert tid1.startswith("tree-")
    assert [t.key for t in store.list_targets()] == [tid1]  # _blobs/ is never a target
    packs1 = _packs(store)
    assert len(packs1) == 1
    cache = WorkspaceCache(settings)
    for mode, rid in (("shared", None), ("isolated", "r1"), ("copy-on-write", "r2")):
        ws = Path(cache.get_target(tid1, rid, workspace_isolation=mode))
        assert tree_digest(ws) == tree_digest(v1), mode
        assert (ws / "empty").is_dir() and os.access(ws / "run.sh", os.X_OK)
    blobs_v1 = _blob_names(settings)
    assert len(blobs_v1) == 60 + 1  # 60 distinct files + run.sh

    v2 = _change_one(v1, tmp_path / "v2")
    tid2 = store.upload_target(v2)
    assert tid2 != tid1
    new = _packs(store) - packs1
    assert len(new) == 1
    m2 = _manifest(store, tid2, tmp_path)
    in_new = [f for f in m2.files if f.pack in new]
    assert [f.path for f in in_new] == [str(sorted(v2.rglob("f*.py"))[0].relative_to(v2))]

    ws2 = Path(cache.get_target(tid2, None, workspace_isolation="shared"))
    assert tree_digest(ws2) == tree_digest(v2)
    assert len(_blob_names(settings) - blobs_v1) == 1  # one blob fetched, the rest reused

    # unchanged re-upload: same id, no new pack
    assert store.upload_target(v2) == tid2
    assert _packs(store) == packs1 | new


def test_s3_get_of_a_new_version_reads_only_the_new_pack(
    s3_settings: Settings, s3_server: Any, tmp_path: Path
) -> None:
    store: Any = open_store(s3_settings)
    v1 = _project(tmp_path / "v1")
    tid1 = store.upload_target(v1)
    (old_pack,) = _packs(store)
    cache = WorkspaceCache(s3_settings)
    cache.get_target(tid1, None, workspace_isolation="shared")
    s3_server.reset_counts()
    tid2 = store.upload_target(_change_one(v1, tmp_path / "v2"))
    (new_pack,) = _packs(store) - {old_pack}
    sent = s3_server.bytes_received(blobs.PACKS + new_pack)
    assert 0 < sent < 3000  # one compressed 3 kB file
    assert s3_server.bytes_received(blobs.PACKS + old_pack) == 0
    s3_server.reset_counts()
    cache.get_target(tid2, None, workspace_isolation="shared")
    assert s3_server.get_count(blobs.PACKS + old_pack) == 0
    assert s3_server.get_count(blobs.PACKS + new_pack) == 1


def test_explicit_id_directory_and_file_targets(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    store: Any = open_store(any_store_settings)
    v1 = _project(tmp_path / "v1", files=5)
    assert store.upload_target(v1, target_id="my-project") == "my-project"
    f = tmp_path / "single.bin"
    f.write_bytes(os.urandom(1000))
    fid = store.upload_target(f)
    cache = WorkspaceCache(any_store_settings)
    ws = cache.get_target("my-project", "r", workspace_isolation="isolated")
    assert tree_digest(Path(ws)) == tree_digest(v1)
    got = cache.get_target(fid, "r", workspace_isolation="isolated")
    assert Path(got).read_bytes() == f.read_bytes()  # single files stay classic


def test_workspace_files_never_share_an_inode_with_blobs(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    tid = open_store(settings).upload_target(_project(tmp_path / "v1", files=3))
    ws = Path(WorkspaceCache(settings).get_target(tid, "r", workspace_isolation="isolated"))
    blob_dir = tmp_path / "cache" / ".forgespace" / "blobs"
    packs = {p: p.read_bytes() for p in blob_dir.iterdir()}
    inodes = {p.stat().st_ino for p in packs}
    for victim in (ws / "run.sh", *ws.rglob("f*.py")):
        assert victim.stat().st_nlink == 1 and victim.stat().st_ino not in inodes
        victim.write_text("overwritten by the run\n")
    assert {p: p.read_bytes() for p in blob_dir.iterdir()} == packs
    again = WorkspaceCache(settings).get_target(tid, "r2", workspace_isolation="isolated")
    assert tree_digest(Path(again)) == tree_digest(tmp_path / "v1")


# --- bad manifests ------------------------------------------------------------------------
def _hostile(store: Any, tmp: Path, m: Manifest, name: str) -> str:
    """Store a crafted manifest as a target (a file upload: stored as-is)."""
    f = tmp / name
    f.write_bytes(encode_manifest(m))
    return str(store.upload_target(f))


@pytest.fixture
def local_with_blob(tmp_path: Path) -> Iterator[tuple[Settings, Any, FileEntry]]:
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    store: Any = open_store(settings)
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.txt").write_text("real content\n" * 10)
    tid = store.upload_target(src)
    yield settings, store, _manifest(store, tid, tmp_path).files[0]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("escaping path", UnsafeArchiveError),
        ("escaping link", UnsafeArchiveError),
        ("link chain", UnsafeArchiveError),
        ("write through link", UnsafeArchiveError),
        ("wrong digest", IntegrityError),
        ("missing pack", TargetNotFoundError),
        ("garbage", IntegrityError),
        ("too big", UnsafeArchiveError),
    ],
)
def test_bad_manifest_is_refused_and_nothing_is_published(
    local_with_blob: tuple[Settings, Any, FileEntry], tmp_path: Path, case: str, error: type
) -> None:
    settings, store, good = local_with_blob
    other = "0" * 64
    entries: dict[str, tuple[Any, ...]] = {
        "escaping path": (FileEntry("../evil", False, good.size, good.sha256, good.pack,
                                    good.offset, good.length, good.codec),),
        "escaping link": (("l", "out", "../../.."),),
        "link chain": (("d", "b"), ("l", "b/up", ".."), ("l", "a", "b/up/..")),
        "write through link": (("l", "x", "."), FileEntry(
            "x/a.txt", False, good.size, good.sha256, good.pack, good.offset, good.length,
            good.codec)),
        "wrong digest": (FileEntry("a.txt", False, good.size, other, good.pack, good.offset,
                                   good.length, good.codec),),
        "missing pack": (FileEntry("a.txt", False, good.size, "1" * 64, "2" * 64, 0, 10, "raw"),),
        "too big": (FileEntry("a.txt", False, 10**15, "1" * 64, good.pack, 0, 10, "raw"),),
    }  # fmt: skip
    if case == "garbage":
        f = tmp_path / "garbage"
        f.write_bytes(MANIFEST_MAGIC + b"not gzip at all")
        tid = store.upload_target(f)
    else:
        tid = _hostile(store, tmp_path, Manifest("x", entries[case]), case.replace(" ", "-"))
    cache = WorkspaceCache(settings)
    for mode, rid in (("shared", None), ("isolated", "r"), ("copy-on-write", "c")):
        with pytest.raises(error):
            cache.get_target(tid, rid, workspace_isolation=mode)
        assert not (tmp_path / "cache" / tid / "workspace").exists()
        assert not (tmp_path / "cache" / tid / "shared").exists()
        assert not (tmp_path / "cache" / tid / (rid or "x")).exists()
    assert not (tmp_path / "cache" / "evil").exists() and not (tmp_path / "evil").exists()
    assert _blob_names(settings) <= {good.sha256}  # a blob failing its digest is not kept
    blob_dir = tmp_path / "cache" / ".forgespace" / "blobs"
    assert not [p for p in blob_dir.glob("*") if p.name.endswith(".tmp")]


# --- eviction -----------------------------------------------------------------------------
def test_gc_keeps_referenced_blobs_and_evicts_unreferenced_ones(tmp_path: Path) -> None:
    env = {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    settings = Settings.from_env({**env, "CACHE_TTL": "1h"})
    store = open_store(settings)
    a = store.upload_target(_project(tmp_path / "a", files=5, seed="a", size=150_000))
    b_src = _project(tmp_path / "b", files=5, seed="b", size=60_000)
    (b_src / "run.sh").write_text("#!/bin/sh\necho b\n")  # no content in common with a
    b = store.upload_target(b_src)
    cache = WorkspaceCache(settings)
    cache.get_target(a, None, workspace_isolation="shared")
    cache.get_target(b, None, workspace_isolation="shared")
    blob_dir = tmp_path / "cache" / ".forgespace" / "blobs"
    of_b = {f.sha256 for f in _manifest(store, b, tmp_path).files}
    of_a = {f.sha256 for f in _manifest(store, a, tmp_path).files} - of_b
    old = time.time() - 7200
    for p in blob_dir.iterdir():
        os.utime(p, (old, old))  # unused for longer than CACHE_TTL
    cache.gc()
    assert _blob_names(settings) == of_a | of_b  # both still referenced by live entries
    evict_target(cache, a)
    cache.gc()
    assert _blob_names(settings) == of_b  # a's went by TTL; b's are referenced

    # LRU: blob bytes count toward CACHE_MAX_SIZE. a's blobs again (fresh, unreferenced once
    # a is evicted) take the cache over 1 MiB: the least recently used go until it fits.
    cache.get_target(a, None, workspace_isolation="shared")
    evict_target(cache, a)
    assert _blob_names(settings) == of_a | of_b
    small = WorkspaceCache(Settings.from_env({**env, "CACHE_MAX_SIZE": "1MiB"}))
    small.gc()
    assert _blob_names(settings) == of_b  # a's (least recently used) went, none of b's
    assert small.index.total_bytes() + _blob_bytes(settings) <= 1024 * 1024


# --- across processes ---------------------------------------------------------------------
def test_one_download_across_processes(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    store = open_store(any_store_settings)
    src = _project(tmp_path / "v1", files=200)
    tid = store.upload_target(src)
    calls = [(tid, None, "shared")] * 3 + [(tid, f"c{i}", "copy-on-write") for i in range(3)]
    results = run_getters(settings_env(any_store_settings), calls, tmp_path, timeout=120)
    # one download: the other slot copies the verified manifest, and the blobs are shared
    assert sum(bool(r["downloaded"]) for r in results) == 1, results
    assert all(r["digest"] == tree_digest(src) for r in results)


def _child(env: dict[str, str], role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return start_role("incremental", role, spec, env)


def _kill_at(proc: subprocess.Popen[str], signal_file: Path) -> None:
    try:
        wait_for(lambda: signal_file.exists() or proc.poll() is not None, 120, "the pause point")
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


# --- SIGKILL ------------------------------------------------------------------------------
@pytest.mark.parametrize("pause", ["pack-written", "pack-stored"])
def test_sigkill_during_upload_leaves_no_target_and_a_retry_works(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path, pause: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    store: Any = open_store(any_store_settings)
    src = _project(tmp_path / "v1", files=20)
    sig = tmp_path / "paused"
    proc = _child(settings_env(any_store_settings), "upload", {
        "source": str(src), "pause": pause, "signal": str(sig)})  # fmt: skip
    _kill_at(proc, sig)
    assert store.list_targets() == []
    assert len(_packs(store)) == (1 if pause == "pack-stored" else 0)
    tid = store.upload_target(src)  # the dead upload's lease does not block uploads
    assert len(_packs(store)) == 1  # a stored pack of the dead upload is reused, not re-sent
    ws = WorkspaceCache(any_store_settings).get_target(tid, "r", workspace_isolation="isolated")
    assert tree_digest(Path(ws)) == tree_digest(src)
    # the dead upload's lease blocks sweeps until it expires; then prune tidies up
    assert store.sweep_blobs(0.0).skipped
    monkeypatch.setattr(blobs, "LEASE_TTL", 0.0)
    assert not store.sweep_blobs(0.0).skipped
    assert store.blob_list(blobs.LEASES)[0] == []
    assert len(_packs(store)) == 1  # referenced by the target: kept
    if any_store_settings.storage_backend == "local":
        from forgespace.storage.lifecycle import plan_prune

        plan = plan_prune(store, target_ttl=None, result_ttl=None, temp_grace=0.0)
        plan.execute(store)
        assert list((tmp_path / "store" / "_blobs" / "tmp").iterdir()) == []


def test_sigkill_during_blob_download_publishes_nothing(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    store = open_store(any_store_settings)
    src = _project(tmp_path / "v1", files=20)
    tid = store.upload_target(src)
    sig = tmp_path / "paused"
    proc = _child(settings_env(any_store_settings), "get", {
        "target_id": tid, "mode": "shared", "pause": "blob-write", "signal": str(sig)})  # fmt: skip
    _kill_at(proc, sig)
    blob_dir = tmp_path / "cache" / ".forgespace" / "blobs"
    assert any(p.name.endswith(".tmp") for p in blob_dir.iterdir())  # killed mid-blob
    assert not (tmp_path / "cache" / tid / "workspace").exists()
    cache = WorkspaceCache(any_store_settings)
    ws = cache.get_target(tid, None, workspace_isolation="shared")
    assert tree_digest(Path(ws)) == tree_digest(src)
    cache.gc()
    assert not any(p.name.endswith(".tmp") for p in blob_dir.iterdir())


def test_sigkill_during_prune_keeps_every_referenced_pack(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    store: Any = open_store(any_store_settings)
    keep = store.upload_target(_project(tmp_path / "keep", files=5, seed="k"))
    for seed in ("x", "y"):
        store.delete_target(store.upload_target(_project(tmp_path / seed, files=5, seed=seed)))
    assert len(_packs(store)) == 3
    sig = tmp_path / "paused"
    spec = {"pause": "deleted", "signal": str(sig)}
    proc = _child(settings_env(any_store_settings), "sweep", spec)
    _kill_at(proc, sig)
    # the dead sweep's marker makes uploads wait until it expires (SWEEP_TTL), no longer
    with pytest.raises(StorageError, match="blob sweep"):
        blobs.begin_upload(store, wait=0.0)
    monkeypatch.setattr(blobs, "SWEEP_TTL", 2.0)
    t0 = time.monotonic()
    tid = store.upload_target(_project(tmp_path / "new", files=5, seed="n"))
    assert time.monotonic() - t0 < 30
    res = store.sweep_blobs(0.0)
    assert not res.skipped
    live = {f.pack for t in (keep, tid) for f in _manifest(store, t, tmp_path).files}
    assert _packs(store) == live
    for t in (keep, tid):
        ws = WorkspaceCache(any_store_settings).get_target(t, None, workspace_isolation="shared")
        assert Path(ws).is_dir()


# --- prune racing uploads -------------------------------------------------------------------
def test_sweep_and_upload_exclude_each_other(any_store_settings: Settings, tmp_path: Path) -> None:
    store: Any = open_store(any_store_settings)
    store.delete_target(store.upload_target(_project(tmp_path / "x", files=3)))
    lease = blobs.begin_upload(store)
    res = store.sweep_blobs(0.0)
    assert res.skipped and res.deleted == ()  # a live upload may reference any pack
    blobs.end_upload(store, lease)
    store.blob_put(blobs.SWEEPS + "live", b"")
    with pytest.raises(StorageError, match="blob sweep"):
        blobs.begin_upload(store, wait=0.2)
    store.blob_delete(blobs.SWEEPS + "live")
    assert len(store.sweep_blobs(0.0).deleted) == 1


def _paused_in_upload(monkeypatch: pytest.MonkeyPatch, go: threading.Event) -> threading.Event:
    """Make the next upload wait, lease held, until ``go`` is set; returns "it is waiting"."""
    waiting = threading.Event()
    real = blobs.known_blobs

    def paused(io: Any) -> Any:
        waiting.set()
        go.wait(timeout=60)
        return real(io)

    monkeypatch.setattr(blobs, "known_blobs", paused)
    return waiting


def test_a_long_upload_keeps_its_lease_live_past_the_lease_ttl(
    any_store_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload re-writes its lease while it runs: a sweep longer than LEASE_TTL into it
    still finds it live and deletes nothing; once it ends, its lease is gone."""
    store: Any = open_store(any_store_settings)
    store.delete_target(store.upload_target(_project(tmp_path / "x", files=3, seed="x")))
    monkeypatch.setattr(blobs, "LEASE_TTL", 3.0)  # S3 times have 1 s resolution
    monkeypatch.setattr(blobs, "LEASE_RENEW", 0.05)
    go = threading.Event()
    waiting = _paused_in_upload(monkeypatch, go)
    done: list[str] = []
    up = threading.Thread(target=lambda: done.append(store.upload_target(_project(tmp_path / "v"))))
    up.start()
    try:
        assert waiting.wait(timeout=60)
        time.sleep(4.0)  # past LEASE_TTL since the lease was first written
        res = store.sweep_blobs(0.0)
        assert res.skipped == "an upload is in progress" and res.deleted == ()
    finally:
        go.set()
        up.join(timeout=120)
    assert store.blob_list(blobs.LEASES)[0] == []  # ended: no renewal writes it back
    assert store.sweep_blobs(0.0).skipped == ""
    ws = WorkspaceCache(any_store_settings).get_target(done[0], None, "shared")
    assert tree_digest(Path(ws)) == tree_digest(tmp_path / "v")


def test_an_upload_that_cannot_renew_its_lease_publishes_nothing(
    any_store_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: Any = open_store(any_store_settings)
    monkeypatch.setattr(blobs, "LEASE_RENEW", 0.05)
    monkeypatch.setattr(blobs, "LEASE_STALE", 0.5)
    real_put = store.blob_put

    def put(key: str, data: bytes) -> None:
        if key.startswith(blobs.LEASES) and store.blob_list(blobs.LEASES)[0]:
            raise StorageError(f"PUT {key}: the store is unreachable")  # every renewal fails
        real_put(key, data)

    monkeypatch.setattr(store, "blob_put", put)
    go = threading.Event()
    _paused_in_upload(monkeypatch, go)
    threading.Timer(1.0, go.set).start()  # twice LEASE_STALE without a renewal
    renewed = r"could not be renewed for \d+ s .*nothing was published"
    with pytest.raises(StorageError, match=renewed):
        store.upload_target(_project(tmp_path / "v"))
    assert store.list_targets() == []
    assert store.blob_list(blobs.LEASES)[0] == []


def test_upload_racing_prune_across_processes_never_loses_a_pack(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    env = settings_env(any_store_settings)
    src = _project(tmp_path / "src", files=10)
    flags = {f: str(tmp_path / f) for f in ("stop", "started", "swept")}
    stop = tmp_path / "stop"
    sweeper = _child(env, "sweeper", flags)
    churn = _child(env, "churn", {"source": str(src), "iterations": 25, "cap": 2000, **flags})
    try:
        churned = _result(churn)
    finally:
        stop.touch()
    swept = _result(sweeper)
    assert churned["lost"] == 0
    assert swept["deleted"] > 0, swept  # the sweeper did delete packs between uploads


def test_content_id_is_the_same_in_both_layouts(tmp_path: Path) -> None:
    from forgespace.storage.local import LocalStore

    src = _project(tmp_path / "src", files=5)
    incremental = LocalStore(tmp_path / "a").upload_target(src)
    classic = LocalStore(tmp_path / "b", incremental=False).upload_target(src)
    assert incremental == classic
    assert is_manifest(tmp_path / "a" / incremental / "target")
    assert not is_manifest(tmp_path / "b" / classic / "target")
    assert content_id("tree", "0" * 64).startswith("tree-")


def test_store_format_archive_keeps_the_classic_layout_and_both_formats_are_read(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    """STORE_FORMAT=archive stores a directory as one tar.gz at ``{id}/target`` (a client
    that only knows the classic layout can read it); the default stores a manifest. Both
    give the same content id, and a worker reads either, whatever its own STORE_FORMAT."""
    import tarfile

    src = _project(tmp_path / "v1", files=8)
    classic_settings = Settings.from_env(
        {**env_for(any_store_settings, base={}), "STORE_FORMAT": "archive"}
    )
    classic: Any = open_store(classic_settings)
    tid = classic.upload_target(src, target_id="classic-copy")
    classic.download_target(tid, tmp_path / "obj")
    with tarfile.open(tmp_path / "obj", "r:gz") as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers()}
    assert {"run.sh", "link.py", "empty"} <= names
    assert not is_manifest(tmp_path / "obj")

    manifest_id = open_store(any_store_settings).upload_target(src)
    assert manifest_id == classic.upload_target(src)  # one content id for both formats
    open_store(any_store_settings).download_target(manifest_id, tmp_path / "m")
    assert is_manifest(tmp_path / "m")

    cache = WorkspaceCache(classic_settings)  # an archive-format worker reads a manifest
    for target in (tid, manifest_id):
        ws = cache.get_target(target, "r1", workspace_isolation="isolated")
        assert tree_digest(Path(ws)) == tree_digest(src)


def test_a_bad_store_format_is_refused_with_the_accepted_ones() -> None:
    from forgespace.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid STORE_FORMAT 'tar': expected one of "
                       "manifest, archive"):  # fmt: skip
        Settings.from_env({"STORE_FORMAT": "tar"})


# --- fetch and build overlap ------------------------------------------------------------------
class _PausingStore:
    """The real store, whose blob fetch stops after its first verified blob until released:
    a test sees exactly what the build did meanwhile."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.paused = threading.Event()
        self.release = threading.Event()
        self.sink: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fetch_blobs(self, files: Any, sink: Any) -> int:
        self.sink = sink
        outer = self

        class Pausing:
            commits = 0

            def begin(self, digest: str) -> None:
                sink.begin(digest)

            def write(self, data: bytes) -> None:
                sink.write(data)

            def abort(self) -> None:
                sink.abort()

            def commit(self) -> None:
                sink.commit()
                self.commits += 1
                if self.commits == 1:
                    outer.paused.set()
                    assert outer.release.wait(60), "never released"

        return int(self.inner.fetch_blobs(files, Pausing()))


def _staged_files(settings: Settings) -> list[Path]:
    tmp = settings.cache_dir / ".forgespace" / "tmp"
    return [p for p in tmp.rglob("*") if p.is_file() and "workspace" in p.parts]


def test_the_workspace_is_built_while_the_blobs_arrive(tmp_path: Path) -> None:
    """A cold get of a manifest target creates workspace files from the blobs already
    verified while the rest are still being fetched (the wire and the file creation overlap),
    and publishes only once everything arrived."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    src = _project(tmp_path / "v1", files=30)
    tid = open_store(settings).upload_target(src)
    store = _PausingStore(open_store(settings))
    cache = WorkspaceCache(settings, store=store)
    got: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: got.update(ws=cache.get_target(tid, None, workspace_isolation="shared"))
    )
    t.start()
    try:
        assert store.paused.wait(60)
        wait_for(lambda: _staged_files(settings), 30, "files built while the fetch waits")
        assert not (settings.cache_dir / tid / "workspace").exists()  # nothing published yet
    finally:
        store.release.set()
        t.join(60)
    assert tree_digest(Path(got["ws"])) == tree_digest(src)
    assert _blob_names(settings) == {f.sha256 for f in _manifest(store, tid, tmp_path).files}


def test_a_build_refusal_stops_the_fetch_and_keeps_no_partial_pack(
    local_with_blob: tuple[Settings, Any, FileEntry], tmp_path: Path
) -> None:
    """A manifest refused by the build (a file written through a link) while its blobs are
    still arriving: the build's error, the fetch stopped, its partial pack discarded."""
    settings, inner, good = local_with_blob
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("other content\n" * 20)
    ob = _manifest(inner, inner.upload_target(other), tmp_path).files[0]
    entries = (
        FileEntry("a.txt", False, good.size, good.sha256, good.pack, good.offset, good.length,
                  good.codec),
        ("l", "x", "."),
        FileEntry("x/b.txt", False, ob.size, ob.sha256, ob.pack, ob.offset, ob.length, ob.codec),
    )  # fmt: skip
    tid = _hostile(inner, tmp_path, Manifest("x", entries), "through-link")
    store = _PausingStore(inner)
    cache = WorkspaceCache(settings, store=store)
    errors: list[BaseException] = []

    def get() -> None:
        try:
            cache.get_target(tid, "r", workspace_isolation="isolated")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=get)
    t.start()
    try:
        assert store.paused.wait(60)
        wait_for(lambda: store.sink is not None and store.sink.cancelled, 30, "the cancel")
    finally:
        store.release.set()
        t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], UnsafeArchiveError), errors
    assert "x/b.txt" in str(errors[0])
    assert not (settings.cache_dir / tid / "r").exists()
    blob_dir = settings.cache_dir / ".forgespace" / "blobs"
    assert not [p for p in blob_dir.iterdir() if p.name.endswith(".tmp")]
    assert _blob_names(settings) == set()  # the stopped fetch published no pack


def test_a_fetch_failing_midway_fails_the_get_with_its_own_error(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    """The second of two packs is missing: the first pack's blobs were already built into
    the workspace when the fetch fails; the get raises the fetch's TargetNotFoundError,
    publishes nothing and keeps no partial pack."""
    store: Any = open_store(any_store_settings)
    a = _project(tmp_path / "a", files=4, seed="a")
    ma = _manifest(store, store.upload_target(a), tmp_path)
    b = tmp_path / "b"
    b.mkdir()
    (b / "late.txt").write_text("only in the second pack\n" * 30)
    mb = _manifest(store, store.upload_target(b), tmp_path)
    late = mb.files[0]
    assert {f.pack for f in ma.files}.isdisjoint({late.pack})
    store.blob_delete(blobs.PACKS + late.pack)
    tid = _hostile(store, tmp_path, Manifest("x", (*ma.entries, late)), "two-packs")
    cache = WorkspaceCache(any_store_settings)
    with pytest.raises(TargetNotFoundError):
        cache.get_target(tid, "r", workspace_isolation="isolated")
    assert not (any_store_settings.cache_dir / tid / "r").exists()
    blob_dir = any_store_settings.cache_dir / ".forgespace" / "blobs"
    assert not [p for p in blob_dir.iterdir() if p.name.endswith(".tmp")]
    assert _blob_names(any_store_settings) == set()


def test_a_manifest_larger_than_the_cache_is_refused_by_its_total(
    local_with_blob: tuple[Settings, Any, FileEntry], tmp_path: Path
) -> None:
    """The refusal names the total the manifest would extract and the limit, for the archive
    as a whole (no member is at fault alone)."""
    settings, store, good = local_with_blob
    huge = FileEntry("a.txt", False, 10**15, "1" * 64, good.pack, 0, 10, "raw")
    tid = _hostile(store, tmp_path, Manifest("x", (huge,)), "huge")
    with pytest.raises(UnsafeArchiveError) as err:
        WorkspaceCache(settings).get_target(tid, "r", workspace_isolation="isolated")
    assert err.value.member is None
    assert f"{10**15} bytes, above the limit of {settings.cache_max_size} bytes" in str(err.value)
