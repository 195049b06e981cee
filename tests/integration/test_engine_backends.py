"""Copy-on-write backends for real: reflinks on a btrfs loop mount, overlay mounts per run
(start-up probe, isolation, cleanup unmounts, leftovers of a killed run unmounted)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project, start_getter, tree_digest, wait_for

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import BackendUnavailableError

pytestmark = pytest.mark.integration


def _mounts_under(root: Path) -> list[Path]:
    from forgespace.cache.overlay import mounts_under

    return mounts_under(root)


@pytest.mark.btrfs
def test_copy_backend_reflinks_on_btrfs(
    btrfs_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(btrfs_dir / f"cache-{os.getpid()}"), "STORAGE_DIR": str(tmp_path / "s")}
    )
    cache = WorkspaceCache(settings)
    project = make_project(tmp_path / "project", files=40, size=50_000)
    tid = cache.store.upload_target(project)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    a = Path(cache.get_target(tid, "a", "copy-on-write"))
    b = Path(cache.get_target(tid, "b", "copy-on-write"))
    methods = [r.getMessage() for r in caplog.records if "materialised by" in r.getMessage()]
    assert len(methods) == 2 and all("materialised by reflink" in m for m in methods), methods
    f = a / "pkg0" / "sub0" / "f0.py"
    r = subprocess.run(["filefrag", "-v", str(f)], capture_output=True, text=True)
    if r.returncode == 0:
        assert "shared" in r.stdout, r.stdout  # extents shared with the shared copy
    f.write_text("written by a")
    assert (b / "pkg0" / "sub0" / "f0.py").read_bytes() == (
        project / "pkg0/sub0/f0.py"
    ).read_bytes()
    shared = cache.layout.cow_shared_workspace(tid)
    assert tree_digest(shared) == tree_digest(project)


@pytest.fixture
def overlay_settings(settings: Settings) -> Settings:
    return settings.with_(cow_backend="overlay")


@pytest.fixture
def overlay_cache(overlay_settings: Settings) -> WorkspaceCache:
    try:
        return WorkspaceCache(overlay_settings)
    except BackendUnavailableError as exc:
        pytest.skip(f"overlay mounts refused here: {exc}")


def test_overlay_runs_isolated_cleanup_unmounts(
    overlay_cache: WorkspaceCache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = overlay_cache
    project = make_project(tmp_path / "project", files=30)
    tid = cache.store.upload_target(project)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    runs = [Path(cache.get_target(tid, f"o{i}", "copy-on-write")) for i in range(2)]
    assert any("materialised by overlay" in r.getMessage() for r in caplog.records)
    mounts = _mounts_under(cache.layout.root)
    assert set(runs) <= set(mounts)
    for i, ws in enumerate(runs):
        assert tree_digest(ws) == tree_digest(project)
        (ws / f"marker-{i}").write_text(str(i))
        (ws / "pkg0" / "sub0" / "f0.py").write_text(f"run {i}")
    for i, ws in enumerate(runs):
        assert not (ws / f"marker-{1 - i}").exists()
        assert (ws / "pkg0" / "sub0" / "f0.py").read_text() == f"run {i}"
    assert tree_digest(cache.layout.cow_shared_workspace(tid)) == tree_digest(project)
    # an overlay lease pins the shared copy beneath the run as well
    pins = {lease.lease_id: lease.pins for lease in cache.index.live_leases()}
    assert pins[f"{tid}/o0"] == (f"{tid}/o0", f"{tid}/shared")

    for ws in runs:
        cache.cleanup_cache(ws, "copy-on-write")
    assert _mounts_under(cache.layout.root) == []
    assert not any((cache.layout.overlay_dir / tid).iterdir())
    assert not (cache.layout.root / tid / "o0").exists()
    assert tree_digest(cache.layout.cow_shared_workspace(tid)) == tree_digest(project)


def test_overlay_mount_of_killed_run_is_unmounted_and_removed(
    overlay_cache: WorkspaceCache,
    overlay_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    cache = overlay_cache
    project = make_project(tmp_path / "project", files=10)
    tid = cache.store.upload_target(project)
    cache.get_target(tid, "warm", "copy-on-write")
    sig = tmp_path / "sig"
    p = start_getter(
        settings_env(overlay_settings),
        tid,
        "victim",
        "copy-on-write",
        pause_at="cow-copied",
        signal_dir=sig,
    )
    try:
        wait_for(lambda: any(sig.glob("cow-copied.*")), 30, "the child to mount its overlay")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
    assert _mounts_under(cache.layout.tmp_dir), "the killed run left its mount in staging"
    res = cache.get_target(tid, "next", "copy-on-write")
    assert tree_digest(Path(res)) == tree_digest(project)
    assert _mounts_under(cache.layout.tmp_dir) == []
    assert [n for n in os.listdir(cache.layout.tmp_dir) if n.startswith(tid)] == []
    assert not (cache.layout.overlay_dir / tid / "victim").exists(), "its upper/work dirs too"
    cache.cleanup_cache(res, "copy-on-write")
    cache.cleanup_cache(cache.layout.run_dir(tid, "warm"), "copy-on-write")
    assert _mounts_under(cache.layout.root) == []


def test_overlay_lost_by_a_reboot_is_mounted_again_with_the_runs_writes(
    overlay_cache: WorkspaceCache, tmp_path: Path
) -> None:
    from forgespace.cache.overlay import unmount

    cache = overlay_cache
    project = make_project(tmp_path / "project", files=10)
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, "r1", "copy-on-write"))
    (ws / "progress.txt").write_text("half done")
    unmount(ws)  # what a reboot does to the mount; the upper layer stays on disk
    assert not (ws / "progress.txt").exists()
    again = cache.get_target_report(tid, "r1", "copy-on-write")
    assert again.path == str(ws) and not again.downloaded
    assert os.path.ismount(ws)
    assert (ws / "progress.txt").read_text() == "half done"
    cache.cleanup_cache(ws, "copy-on-write")
    assert _mounts_under(cache.layout.root) == []


def test_overlay_refused_fails_at_start_up_with_the_reason(
    overlay_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    """Without CAP_SYS_ADMIN (dropped from the bounding set) the cache refuses to start."""
    import shutil
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found: cannot drop CAP_SYS_ADMIN for the child")
    code = (
        "from forgespace import Settings, WorkspaceCache\n"
        "from forgespace.errors import BackendUnavailableError\n"
        "try:\n"
        "    WorkspaceCache(Settings.from_env())\n"
        "except BackendUnavailableError as e:\n"
        "    print('REFUSED', e)\n"
        "else:\n"
        "    print('STARTED')\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", code],
        env=settings_env(overlay_settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "setpriv:" in out.stderr:
        pytest.skip(f"setpriv refused: {out.stderr.strip()}")
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr
    assert "CAP_SYS_ADMIN" in out.stdout and "overlay" in out.stdout
