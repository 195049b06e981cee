"""Overlay upper/work directories are owned by the staging attempt (then the run) that made
them and are reclaimed with it, never while mounted (issue 12, findings 7 and 8).

A getter is SIGKILLed with its overlay mounted in staging (support.faults at
``Phase.COW_COPIED``); a retry of the same run id is held at the same phase in another
process (cache hooks) while a sweep runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.faults import HoldAt
from support.procs import make_project, start_getter, tree_digest, wait_for

from forgespace.cache import overlay
from forgespace.cache.hooks import Phase
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import BackendUnavailableError

pytestmark = pytest.mark.integration

CTX = multiprocessing.get_context("fork")
WAIT_S = 60.0


@pytest.fixture
def ov_settings(settings: Settings) -> Iterator[Settings]:
    settings = settings.with_(cow_backend="overlay")
    try:
        WorkspaceCache(settings)
    except BackendUnavailableError as exc:
        pytest.skip(f"overlay mounts refused here: {exc}")
    yield settings
    for mp in overlay.mounts_under(settings.cache_dir):
        overlay.unmount(mp)


def _pause_getter(env: dict[str, str], tid: str, rid: str, sig_dir: Path) -> Any:
    """A getter of run ``rid`` paused with its overlay mounted in staging (alive)."""
    p = start_getter(env, tid, rid, "copy-on-write", pause_at="cow-copied", signal_dir=sig_dir)
    wait_for(lambda: any(sig_dir.glob("cow-copied.*")), 30, "the getter to mount its overlay")
    return p


def _kill(p: Any) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL


def _overlay_entries(cache: WorkspaceCache, tid: str) -> list[Path]:
    base = cache.layout.overlay_dir / tid
    return sorted(base.rglob("upper")) if base.exists() else []


def test_gc_of_a_killed_overlay_getter_leaves_no_overlay_dir(
    ov_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", files=10, size=2_000)
    cache = WorkspaceCache(ov_settings)
    tid = cache.store.upload_target(project)
    cache.get_target(tid, "warm", "copy-on-write")
    _kill(_pause_getter(settings_env(ov_settings), tid, "victim", tmp_path / "sig"))
    assert any(cache.layout.tmp_dir.glob(f"{tid}~*")), "the killed attempt is still staged"
    assert len(_overlay_entries(cache, tid)) == 2  # warm's and the victim's

    report = cache.gc()
    assert any(p.kind == "staging" for p in report.evicted)
    assert not any(cache.layout.tmp_dir.glob(f"{tid}~*"))
    # only the live run's upper layer is left, and it is the one its mount uses
    (upper,) = _overlay_entries(cache, tid)
    ws = cache.layout.run_workspace(tid, "warm")
    (ws / "written-by-warm").write_text("x")
    assert (upper / "written-by-warm").read_text() == "x"
    # nothing of the victim is mounted any more
    assert overlay.mounts_under(cache.layout.root) == [ws]
    # a second gc finds nothing more to do
    assert cache.gc().evicted == []
    assert _overlay_entries(cache, tid) == [upper]


def test_an_overlay_dir_whose_staging_is_gone_is_reclaimed_by_gc(
    ov_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    """The staging dir of a killed attempt went without its overlay dir (an older version, a
    crash mid-removal): gc still reclaims the overlay dir, which nothing else points to."""
    project = make_project(tmp_path / "project", files=5, size=1_000)
    cache = WorkspaceCache(ov_settings)
    tid = cache.store.upload_target(project)
    cache.get_target(tid, "warm", "copy-on-write")
    _kill(_pause_getter(settings_env(ov_settings), tid, "victim", tmp_path / "sig"))
    from forgespace.cache import fsops

    for stage in cache.layout.tmp_dir.glob(f"{tid}~*"):
        fsops.unmount_under([stage], root=cache.layout.root)
        fsops.remove(cache.layout.root, stage)  # the staging dir alone
    assert len(_overlay_entries(cache, tid)) == 2
    cache.gc()
    assert len(_overlay_entries(cache, tid)) == 1
    assert cache.sweep_leftovers() == []


def _retry_child(settings: Settings, hooks: HoldAt, tid: str, rid: str, out: Any) -> None:
    try:
        cache = WorkspaceCache(settings, hooks=hooks)
        ws = Path(cache.get_target(tid, rid, "copy-on-write"))
        (ws / "written-by-retry").write_text("retry")
        out.put(("ok", str(ws)))
    except BaseException as exc:
        out.put(("error", repr(exc)))


def test_a_sweep_keeps_the_upper_layer_of_a_live_retry(
    ov_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    """Attempt 1 of run R is staging (alive) when attempt 2 of R starts and is held with its
    overlay mounted; attempt 1 then dies and a sweep removes what it left. Attempt 2's upper
    layer survives both attempt 2's own start and the sweep: its writes land on disk."""
    project = make_project(tmp_path / "project", files=10, size=2_000)
    cache = WorkspaceCache(ov_settings)
    tid = cache.store.upload_target(project)
    cache.get_target(tid, "warm", "copy-on-write")
    first = _pause_getter(settings_env(ov_settings), tid, "R", tmp_path / "sig")

    hooks = HoldAt(Phase.COW_COPIED)
    out = CTX.Queue()
    retry = CTX.Process(target=_retry_child, args=(ov_settings, hooks, tid, "R", out))
    retry.start()
    try:
        assert hooks.arrived.wait(WAIT_S), "the retry never mounted its overlay"
        _kill(first)
        removed = cache.sweep_leftovers()
        assert any(p.parent == cache.layout.tmp_dir for p in removed), removed
        hooks.go.set()
        status, value = out.get(timeout=WAIT_S)
        retry.join(WAIT_S)
    finally:
        if retry.is_alive():
            retry.kill()
            retry.join(10)
    assert status == "ok", value
    ws = Path(value)
    assert ws == cache.layout.run_workspace(tid, "R")
    assert tree_digest(ws).keys() >= tree_digest(project).keys()
    uppers = [u for u in _overlay_entries(cache, tid) if (u / "written-by-retry").exists()]
    assert len(uppers) == 1, "the retry's write is in its upper layer on disk"
    assert (uppers[0] / "written-by-retry").read_text() == "retry"
    # the killed first attempt left nothing: one upper layer per live run
    cache.gc()
    assert len(_overlay_entries(cache, tid)) == 2


class _FailAt:
    """Hooks that make the get fail at ``phase`` (as a full disk or a bug would)."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def reached(self, phase: Phase) -> None:
        if phase == self.phase:
            raise OSError(f"injected failure at {phase}")


def test_a_get_that_fails_after_mounting_leaves_nothing_after_gc(
    ov_settings: Settings, tmp_path: Path
) -> None:
    """A live getter whose publish fails removes its own staging directory on the way out;
    its overlay upper/work dirs are not indexed anywhere, yet gc reclaims them."""
    project = make_project(tmp_path / "project", files=5, size=1_000)
    cache = WorkspaceCache(ov_settings)
    tid = cache.store.upload_target(project)
    cache.get_target(tid, "warm", "copy-on-write")
    failing = WorkspaceCache(ov_settings, hooks=_FailAt(Phase.STAGED_RUN))
    with pytest.raises(OSError, match="injected"):
        failing.get_target(tid, "doomed", "copy-on-write")
    assert not any(cache.layout.tmp_dir.glob(f"{tid}~*"))
    assert overlay.mounts_under(cache.layout.root) == [cache.layout.run_workspace(tid, "warm")]
    cache.gc()
    assert not (cache.layout.overlay_dir / tid / "doomed").exists()
    assert len(_overlay_entries(cache, tid)) == 1
    # and the run itself, asked again, is built afresh
    ws = Path(cache.get_target(tid, "doomed", "copy-on-write"))
    assert tree_digest(ws) == tree_digest(project)


def test_ownership_alone_keeps_an_unmounted_attempt_dir(settings: Settings) -> None:
    """Without any mount: a live staging attempt's overlay dir is kept by every sweep (its
    owner lock is held), and reclaimed once that staging directory is gone."""
    from forgespace.cache import staging

    cache = WorkspaceCache(settings)
    layout = cache.layout
    with staging.staging_dir(layout, "t1", "run-r1") as stage:
        base = staging.overlay_attempt_dir(layout, "t1", "r1", stage)
        (base / "upper").mkdir(parents=True)
        assert staging.sweep_overlays(layout) == []
        assert cache.sweep_leftovers() == []
        assert (base / "upper").is_dir()
    assert staging.sweep_overlays(layout) == [base]
    assert not (layout.overlay_dir / "t1").exists()
