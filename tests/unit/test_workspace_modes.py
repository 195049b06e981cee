"""WorkspaceCache in one process on the local store: layout of the three modes, isolation,
read-only shared copies, leases, logs, validation, non-archive targets."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from support.procs import make_project, tree_digest

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import (
    InvalidIdError,
    InvalidModeError,
    LockTimeoutError,
    TargetNotFoundError,
    UnsafeArchiveError,
)
from forgespace.storage import open_store


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", files=30)


@pytest.fixture
def cache(settings: Settings) -> WorkspaceCache:
    return WorkspaceCache(settings)


@pytest.fixture
def tid(cache: WorkspaceCache, project: Path) -> str:
    return cache.store.upload_target(project)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_shared_layout_contents_and_read_only(
    cache: WorkspaceCache, tid: str, project: Path
) -> None:
    res = cache.get_target_report(tid, None, "shared")
    root = cache.layout.root
    assert res.path == str(root / tid / "workspace") and res.downloaded
    assert (root / tid / "target").is_file()
    ws = Path(res.path)
    assert tree_digest(ws) == tree_digest(project)
    assert stat.S_IMODE(ws.stat().st_mode) == 0o555
    assert stat.S_IMODE((ws / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((ws / "pkg0" / "sub0" / "f0.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((ws / "pkg0").stat().st_mode) == 0o555
    again = cache.get_target_report(tid, "r2", "shared")
    assert again.path == res.path and not again.downloaded
    assert cache.index.counters().get("downloads") == 1


def test_isolated_runs_download_each_and_do_not_see_each_other(
    cache: WorkspaceCache, tid: str, project: Path
) -> None:
    a = cache.get_target_report(tid, "run-a", "isolated")
    b = cache.get_target_report(tid, "run-b", "isolated")
    root = cache.layout.root
    assert a.path == str(root / tid / "run-a" / "workspace") and a.downloaded
    assert b.path == str(root / tid / "run-b" / "workspace") and b.downloaded
    assert (root / tid / "run-a" / "target").is_file()
    for p, name in ((a.path, "a"), (b.path, "b")):
        (Path(p) / f"marker-{name}").write_text(name)
        (Path(p) / "pkg0" / "sub0" / "f0.py").write_text(f"changed by {name}")
    assert not (Path(a.path) / "marker-b").exists()
    assert not (Path(b.path) / "marker-a").exists()
    assert (Path(a.path) / "pkg0" / "sub0" / "f0.py").read_text() == "changed by a"
    assert cache.index.counters().get("downloads") == 2
    # the same run asking again (a retried activity) gets its own workspace back
    again = cache.get_target_report(tid, "run-a", "isolated")
    assert again.path == a.path and not again.downloaded
    assert (Path(again.path) / "marker-a").exists()


def test_copy_on_write_one_download_private_writable_copies_pristine_shared(
    cache: WorkspaceCache, tid: str, project: Path
) -> None:
    runs = [cache.get_target_report(tid, f"r{i}", "copy-on-write") for i in range(3)]
    root = cache.layout.root
    assert [r.downloaded for r in runs] == [True, False, False]
    assert cache.index.counters().get("downloads") == 1
    shared_ws = root / tid / "shared" / "workspace"
    assert (root / tid / "shared" / "target").is_file()
    assert stat.S_IMODE(shared_ws.stat().st_mode) == 0o555
    for i, r in enumerate(runs):
        assert r.path == str(root / tid / f"r{i}" / "workspace")
        ws = Path(r.path)
        assert tree_digest(ws) == tree_digest(project)
        (ws / f"marker-{i}").write_text(str(i))  # writable: the run's own copy
        (ws / "pkg1" / "sub1" / "f1.py").write_text(f"run {i}")
        assert stat.S_IMODE((ws / "run.sh").stat().st_mode) & 0o111
    for i, r in enumerate(runs):
        names = {p.name for p in Path(r.path).iterdir()}
        assert {n for n in names if n.startswith("marker-")} == {f"marker-{i}"}
        assert (Path(r.path) / "pkg1" / "sub1" / "f1.py").read_text() == f"run {i}"
    assert tree_digest(shared_ws) == tree_digest(project)
    assert not (root / tid / "workspace").exists(), "copy-on-write never fills the shared slot"


def test_non_archive_target_returned_as_target_file(cache: WorkspaceCache, tmp_path: Path) -> None:
    f = tmp_path / "app.bin"
    f.write_bytes(b"\x7fELF" + bytes(range(256)) * 10)
    fid = cache.store.upload_target(f)
    root = cache.layout.root
    assert cache.get_target(fid, None, "shared") == str(root / fid / "target")
    assert cache.get_target(fid, "r1", "isolated") == str(root / fid / "r1" / "target")
    cow = cache.get_target(fid, "r2", "copy-on-write")
    assert cow == str(root / fid / "r2" / "target")
    assert Path(cow).read_bytes() == f.read_bytes()
    Path(cow).write_bytes(b"mine")  # the run's copy is writable and private
    assert (root / fid / "shared" / "target").read_bytes() == f.read_bytes()
    assert not (root / fid / "workspace").exists()
    assert cache.get_target(fid, "r3", "shared") == str(root / fid / "target")


def test_logs_hit_and_miss_naming_the_store(
    cache: WorkspaceCache, tid: str, project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = cache.store.upload_target(project, target_id="other-target")
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    cache.get_target(tid, "r1", "shared")
    cache.get_target(tid, "r2", "shared")
    cache.get_target(other, "r3", "copy-on-write")
    cache.get_target(other, "r4", "copy-on-write")
    msgs = [r.getMessage() for r in caplog.records if r.name == "forgespace.cache"]
    assert f"Cache MISS: {tid} (mode: shared), downloading from local store" in msgs
    assert f"Cache HIT: {tid} (mode: shared)" in msgs
    assert f"Cache MISS: {other} (mode: copy-on-write), downloading from local store" in msgs
    assert f"Cache HIT: {other} (mode: copy-on-write)" in msgs


@pytest.mark.parametrize("first", ["shared", "copy-on-write"])
def test_shared_and_copy_on_write_of_one_target_download_once(
    cache: WorkspaceCache, tid: str, project: Path, first: str
) -> None:
    second = "copy-on-write" if first == "shared" else "shared"
    a = cache.get_target_report(tid, "r1", first)
    b = cache.get_target_report(tid, "r2", second)
    assert a.downloaded and not b.downloaded, "the second copies the verified download"
    assert cache.index.counters().get("downloads") == 1
    assert tree_digest(Path(b.path)) == tree_digest(project)
    root = cache.layout.root
    assert (root / tid / "target").read_bytes() == (root / tid / "shared" / "target").read_bytes()


def test_leases_recorded_per_mode_and_ended_by_cleanup(cache: WorkspaceCache, tid: str) -> None:
    cache.get_target(tid, None, "shared")
    assert cache.index.live_leases() == [], "shared without run id takes no lease"
    ws = cache.get_target(tid, "s1", "shared")
    iso = cache.get_target(tid, "i1", "isolated")
    cow = cache.get_target(tid, "c1", "copy-on-write")
    leases = {lease.lease_id: lease for lease in cache.index.live_leases()}
    assert set(leases) == {f"{tid}/workspace#s1", f"{tid}/i1", f"{tid}/c1"}
    assert leases[f"{tid}/workspace#s1"].pins == (f"{tid}/workspace",)
    assert leases[f"{tid}/i1"].pins == (f"{tid}/i1",)
    assert leases[f"{tid}/c1"].pins == (f"{tid}/c1",)
    lease = leases[f"{tid}/i1"]
    assert lease.expires - lease.created == pytest.approx(cache.settings.cache_lease_ttl)
    assert lease.holder.endswith(f":{os.getpid()}")

    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    cache.cleanup_cache(ws, "shared", run_id="s1")
    assert cache.index.live_leases() == []
    root = cache.layout.root
    assert not (root / tid / "i1").exists() and not (root / tid / "c1").exists()
    assert (root / tid / "shared" / "workspace").is_dir(), "copy-on-write keeps shared/"
    assert Path(ws).is_dir(), "shared cleanup removes nothing"
    # cleanup twice (a retried activity) is fine
    cache.cleanup_cache(iso, "isolated")


@pytest.mark.parametrize(
    ("target_id", "run_id", "mode", "error"),
    [
        ("bad/id", "r", "isolated", InvalidIdError),
        ("shared", "r", "isolated", InvalidIdError),
        ("t", "../x", "isolated", InvalidIdError),
        ("t", "workspace", "copy-on-write", InvalidIdError),
        ("t", None, "isolated", InvalidIdError),
        ("t", None, "copy-on-write", InvalidIdError),
        ("t", "r", "sharde", InvalidModeError),
        ("t", "r", "", InvalidModeError),
    ],
)
def test_invalid_input_rejected_before_touching_anything(
    cache: WorkspaceCache, target_id: str, run_id: str | None, mode: str, error: type
) -> None:
    before = _tree(cache.layout.root)
    with pytest.raises(error) as ei:
        cache.get_target(target_id, run_id, mode)
    assert isinstance(ei.value, ValueError)
    assert "expected" in str(ei.value) or "required" in str(ei.value)
    assert _tree(cache.layout.root) == before
    assert cache.index.live_leases() == []


@pytest.mark.parametrize("mode", ["shared", "isolated", "copy-on-write"])
def test_missing_target_leaves_nothing_behind(cache: WorkspaceCache, mode: str) -> None:
    with pytest.raises(TargetNotFoundError):
        cache.get_target("no-such-target", "r1", mode)
    assert os.listdir(cache.layout.tmp_dir) == []
    assert not (cache.layout.root / "no-such-target").exists()
    assert cache.index.live_leases() == []


def test_unsafe_archive_rejected_and_nothing_left(cache: WorkspaceCache, tmp_path: Path) -> None:
    import io
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        data = b"pwned"
        info = tarfile.TarInfo("../../escape.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    bid = cache.store.upload_target(bad)
    for mode in ("shared", "copy-on-write", "isolated"):
        with pytest.raises(UnsafeArchiveError):
            cache.get_target(bid, "r1", mode)
    assert os.listdir(cache.layout.tmp_dir) == []
    assert not (cache.layout.root / bid / "workspace").exists()
    assert not (cache.layout.root / bid / "shared").exists()
    assert not (cache.layout.root / bid / "r1").exists()
    assert not list(tmp_path.rglob("escape.txt"))


def test_store_passed_in_is_used(settings: Settings, project: Path) -> None:
    store = open_store(settings)
    tid = store.upload_target(project)
    cache = WorkspaceCache(settings, store=store)
    assert cache.store is store
    assert Path(cache.get_target(tid, "r", "isolated")).is_dir()


@pytest.mark.parametrize("mode", ["shared", "copy-on-write"])
def test_wait_for_a_stuck_download_is_bounded_and_names_target_and_holder(
    settings: Settings, project: Path, mode: str
) -> None:
    cache = WorkspaceCache(settings.with_(cache_lock_timeout=0.3))
    tid = cache.store.upload_target(project)
    import time

    # another download of this target in progress (the lock is per open file: this holds
    # it against the get below exactly as another process would)
    with cache.target_lock(tid, exclusive=True, purpose="download shared"):
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as ei:
            cache.get_target(tid, "r1", mode)
        waited = time.monotonic() - t0
    assert 0.25 <= waited < 3
    msg = str(ei.value)
    assert f"target {tid}" in msg and f"pid {os.getpid()}" in msg and "download shared" in msg
    assert cache.index.live_leases() == []
    assert Path(cache.get_target(tid, "r2", mode)).is_dir()  # free again: works


def test_progress_reports_the_download_and_nothing_on_a_hit(settings: Settings, tmp_path: Path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * 2**20 + 17))
    tid = open_store(settings).upload_target(blob)
    cache = WorkspaceCache(settings)
    calls: list[tuple[int, int]] = []

    def record(done: int, total: int) -> None:
        calls.append((done, total))

    first = cache.get_target_report(tid, "r1", "shared", progress=record)
    assert first.downloaded
    assert calls and calls[-1] == (3 * 2**20 + 17, 3 * 2**20 + 17)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    second = cache.get_target_report(
        tid, "r2", "shared", progress=lambda d, t: calls.append((d, t))
    )
    assert not second.downloaded and calls == []


@pytest.mark.parametrize("mode", ["isolated", "shared", "copy-on-write"])
def test_refused_archive_names_the_target_and_leaves_the_cache_as_it_was(
    settings: Settings, tmp_path: Path, mode: str
):
    import io
    import tarfile

    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as t:
        for name in ("ok.txt", "../escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    tid = open_store(settings).upload_target(evil)
    cache = WorkspaceCache(settings)
    with pytest.raises(UnsafeArchiveError) as ei:
        cache.get_target(tid, "r1", mode)
    message = str(ei.value)
    assert f"target {tid} refused" in message and "'../escape.txt'" in message
    assert ".forgespace" not in message  # the staging path is ours, not the user's
    assert sorted(p.name for p in settings.cache_dir.iterdir()) == [".forgespace"]
    assert cache.index.entries() == [] and cache.index.live_leases() == []
    assert not (settings.cache_dir / ".forgespace" / "escape.txt").exists()
