"""SIGKILL a get_target at several phases; a fresh get then returns a complete workspace and
no leftovers remain.

The child's cache is built with hooks that pause at a named phase (support.faults.PauseAt,
announced by a file in a signal directory) and is killed there; mid-extraction is caught
without a hook by watching the staging workspace fill up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project, start_getter, tree_digest, wait_for

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration


def _kill_at(
    env: dict[str, str], tid: str, rid: str | None, mode: str, phase: str, sig_dir: Path
) -> None:
    p = start_getter(
        env,
        tid,
        rid,
        mode,
        pause_at=phase,
        signal_dir=sig_dir,
    )
    try:
        wait_for(lambda: any(sig_dir.glob(f"{phase}.*")), 30, f"child to reach phase {phase}")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
    assert p.returncode == -signal.SIGKILL


def _assert_no_leftovers(cache: WorkspaceCache, tid: str) -> None:
    assert [n for n in os.listdir(cache.layout.tmp_dir) if n.startswith(tid)] == []
    assert os.listdir(cache.layout.trash_dir) == []


CASES = [
    ("shared", "download"),
    ("shared", "downloaded"),
    ("shared", "extracted"),
    ("shared", "shared-target-published"),
    ("copy-on-write", "download"),
    ("copy-on-write", "extracted"),
    ("copy-on-write", "cow-copied"),
    ("isolated", "downloaded"),
    ("isolated", "staged-run"),
]


@pytest.mark.parametrize(("mode", "phase"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_sigkill_at_phase_then_fresh_get_is_complete(
    settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    mode: str,
    phase: str,
) -> None:
    # big enough that the local store reports progress more than once
    project = make_project(tmp_path / "project", files=60, size=30_000)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    if phase == "cow-copied":
        cache.get_target(tid, "warm", mode)  # the shared copy exists; kill the run's copy
    _kill_at(settings_env(settings), tid, "victim", mode, phase, tmp_path / "sig")

    # nothing the killed process left is visible as complete
    assert not (cache.layout.run_dir(tid, "victim")).exists()
    if mode == "shared" and phase != "shared-target-published":
        assert not cache.layout.shared_workspace(tid).exists()
    if mode == "copy-on-write" and phase != "cow-copied":
        assert not cache.layout.cow_shared_dir(tid).exists()

    res = cache.get_target_report(tid, "next", mode)
    assert tree_digest(Path(res.path)) == tree_digest(project)
    if mode != "shared":
        assert res.path == str(cache.layout.run_workspace(tid, "next"))
    _assert_no_leftovers(cache, tid)
    # the killed run's own retry gets a complete workspace too
    retry = cache.get_target_report(tid, "victim", mode)
    assert tree_digest(Path(retry.path)) == tree_digest(project)


@pytest.mark.slow
def test_sigkill_mid_extraction(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", files=6000, size=64)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    p = start_getter(settings_env(settings), tid, None, "shared")
    tmp = cache.layout.tmp_dir

    def extracting() -> bool:
        for stage in tmp.glob(f"{tid}~*"):
            ws = stage / "workspace"
            if ws.is_dir() and any(ws.iterdir()):
                return True
        return False

    try:
        wait_for(extracting, 60, "the child to be extracting")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert not cache.layout.shared_workspace(tid).exists()
    assert any(tmp.glob(f"{tid}~*")), "the partial extraction is still staged"
    res = cache.get_target_report(tid, None, "shared")
    assert res.downloaded
    assert tree_digest(Path(res.path)) == tree_digest(project)
    _assert_no_leftovers(cache, tid)


def test_gc_sweep_removes_leftovers_of_killed_runs(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", files=20, size=30_000)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    _kill_at(settings_env(settings), tid, "victim", "isolated", "extracted", tmp_path / "sig")
    assert any(cache.layout.tmp_dir.glob(f"{tid}~*"))
    removed = cache.sweep_leftovers()
    assert removed and not any(cache.layout.tmp_dir.glob(f"{tid}~*"))
    owners = cache.layout.meta_dir / "owners"
    pids = {f.name.split("-")[0] for f in owners.iterdir()}
    assert str(os.getpid()) in pids or not pids
    assert all(pid == str(os.getpid()) for pid in pids), "dead owners' lock files removed"
