"""Ending leases in process: cleanup_cache (every mode, with and without a run id or an owner),
release by ids, release_lease (what the worker's sweep calls), renew, the lease a get records
before it creates anything, and what each of them says when it does nothing.

The same paths run through Temporal and the CLI in the integration tests; these run them in
the test process, where the mutation run (docs/testing.md) can see them."""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.procs import make_project

from forgespace.cache.hooks import Phase
from forgespace.cache.index import LeaseOwner, LeaseRecord
from forgespace.cache.workspace import Released, WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import CacheFullError, InvalidIdError
from forgespace.layout import ID_FORMS


@pytest.fixture
def tid(settings: Settings, tmp_path: Path) -> str:
    return WorkspaceCache(settings).store.upload_target(make_project(tmp_path / "p", files=3))


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def dead_holder() -> str:
    """``host:pid`` of a process of this host that has exited."""
    p = subprocess.Popen(["true"])
    p.wait()
    return f"{socket.gethostname()}:{p.pid}"


def dead_staging(cache: WorkspaceCache, target_id: str) -> Path:
    """A staging directory of ``target_id`` whose owner is gone (no owner lock holds it)."""
    stage = cache.layout.tmp_dir / f"{target_id}~run-x~{'0' * 32}~abcd1234"
    stage.mkdir(parents=True)
    (stage / "part").write_bytes(b"half a download")
    return stage


# --- cleanup_cache ---------------------------------------------------------------------------
def test_cleanup_cache_without_a_mode_cleans_an_isolated_run(settings: Settings, tid: str) -> None:
    """The contract's default: ``cleanup_cache(path)`` is an isolated cleanup."""
    cache = WorkspaceCache(settings)
    path = cache.get_target(tid, "r1", "isolated")
    cache.cleanup_cache(path)
    assert not (cache.layout.root / tid / "r1").exists()
    assert cache.index.all_leases() == []


def test_shared_cleanup_refuses_a_bad_run_id_by_name_and_ends_nothing(
    settings: Settings, tid: str
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, "r1", "shared")
    with pytest.raises(InvalidIdError) as ei:
        cache.cleanup_cache(ws, "shared", run_id="bad id")
    assert str(ei.value) == f"invalid run_id 'bad id': expected {ID_FORMS}"
    assert [le.run_id for le in cache.index.all_leases()] == ["r1"]


def test_shared_cleanup_with_a_run_id_ends_its_lease_or_says_it_held_none(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, "r1", "shared")
    key = f"{tid}/workspace"
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared", run_id="r1")
        assert cache.index.all_leases() == []
        assert not any("holds no lease" in m for m in said(caplog))
        cache.cleanup_cache(ws, "shared", run_id="r1")  # again: nothing left to end
    assert f"cleanup of {key}: run r1 holds no lease on it (no-op)" in said(caplog)
    assert Path(ws).is_dir()  # shared removes nothing


def test_a_run_cleanup_by_another_workflow_leaves_the_run_and_says_whose_it_is(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)
    path = cache.get_target_report(tid, "r1", "isolated", owner=LeaseOwner("a1", "wf-a")).path
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(path, "isolated", owner=LeaseOwner("b1", "wf-b"))
    assert f"cleanup of run r1 of {tid}: its lease is workflow wf-a's, not wf-b's (no-op)" in said(
        caplog
    )
    assert Path(path).is_dir() and [le.run_id for le in cache.index.all_leases()] == ["r1"]


# --- a shared cleanup that names no run ------------------------------------------------------
def test_a_shared_cleanup_without_run_id_ends_its_workflows_leases_and_counts_them(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target_report(tid, "ra", "shared", owner=LeaseOwner("a1", "wf-a")).path
    cache.get_target_report(tid, "rb", "shared", owner=LeaseOwner("b1", "wf-b"))
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared", owner=LeaseOwner("b2", "wf-b"))
    assert f"cleanup of {tid}/workspace: 1 lease(s) of workflow wf-b ended" in said(caplog)
    assert [le.run_id for le in cache.index.all_leases()] == ["ra"]


def test_a_shared_cleanup_without_run_id_ends_the_latest_lease_its_cache_object_took(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, "r1", "shared")
    cache.get_target(tid, "r2", "shared")
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared")
    assert f"cleanup of {tid}/workspace: ended the latest lease this process took" in said(caplog)
    assert [le.run_id for le in cache.index.all_leases()] == ["r1"]


def test_a_shared_cleanup_without_run_id_ends_the_one_lease_whose_process_exited(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, None, "shared")  # takes no lease
    key = f"{tid}/workspace"
    cache.index.add_lease(
        cache.index.new_lease(f"{key}#gone", tid, "gone", (key,), holder=dead_holder())
    )
    gone = cache.index.lease(f"{key}#gone")
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared")
    assert f"cleanup of {key}: ended lease {gone} (its process exited)" in said(caplog)
    assert cache.index.all_leases() == []


def test_a_shared_cleanup_without_run_id_never_ends_another_targets_or_a_workflows_lease(
    settings: Settings, tid: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a lease taken on this workspace outside any workflow may be ended for a dead
    taker: one on another target's workspace, or a workflow's (its cleanup ends it, or the
    worker's sweep), stays, whoever took it."""
    cache = WorkspaceCache(settings)
    ws = cache.get_target(tid, None, "shared")
    key = f"{tid}/workspace"
    nothing = (
        f"cleanup of {key} without a run id: no lease ended (it may be another run's: pass "
        "run_id, or it expires CACHE_LEASE_TTL after its last renewal)"
    )
    others = cache.index.new_lease(
        "u/workspace#r", "u", "r", ("u/workspace",), holder=dead_holder()
    )
    cache.index.add_lease(others)
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared")
    assert [le.lease_id for le in cache.index.all_leases()] == ["u/workspace#r"]
    assert nothing in said(caplog)
    cache.index.end_lease(others.lease_id)
    caplog.clear()
    workflows = cache.index.new_lease(
        f"{key}#w", tid, "w", (key,), holder=dead_holder(), owner=LeaseOwner("a1", "wf-x")
    )
    cache.index.add_lease(workflows)
    with caplog.at_level(logging.DEBUG, "forgespace.cache"):
        cache.cleanup_cache(ws, "shared")
    assert [le.lease_id for le in cache.index.all_leases()] == [f"{key}#w"]
    assert nothing in said(caplog)


# --- release by ids --------------------------------------------------------------------------
def test_release_refuses_bad_ids_by_name(settings: Settings, tid: str) -> None:
    cache = WorkspaceCache(settings)
    cache.get_target(tid, "r1", "isolated")
    for args, what, bad in (
        (("bad id", "r1"), "target_id", "bad id"),
        ((tid, "bad id"), "run_id", "bad id"),
    ):
        with pytest.raises(InvalidIdError) as ei:
            cache.release(*args, "isolated")
        assert str(ei.value) == f"invalid {what} {bad!r}: expected {ID_FORMS}"
    assert (cache.layout.root / tid / "r1").is_dir() and len(cache.index.all_leases()) == 1


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write"])
def test_release_of_a_run_reports_what_it_ended_and_removed(
    settings: Settings, tid: str, mode: str
) -> None:
    """The report the release_run activity returns: the run directory and the target's dead
    staging directories removed (not another target's), the run's one lease ended."""
    cache = WorkspaceCache(settings)
    cache.get_target(tid, "r1", mode)
    cache.get_target(tid, "r2", mode)  # another run of the same target: untouched
    mine, others = dead_staging(cache, tid), dead_staging(cache, "u")
    released = cache.release(tid, "r1", mode)
    run_dir = cache.layout.run_dir(tid, "r1")
    assert released == Released(tid, "r1", mode, 1, [str(mine), str(run_dir)])
    assert released.to_dict() == {
        "target_id": tid,
        "run_id": "r1",
        "workspace_isolation": mode,
        "leases_ended": 1,
        "removed": [str(mine), str(run_dir)],
    }
    assert not run_dir.exists() and not mine.exists() and others.is_dir()
    assert [le.run_id for le in cache.index.all_leases()] == ["r2"]
    # idempotent: nothing left to end or remove
    assert cache.release(tid, "r1", mode) == Released(tid, "r1", mode, 0, [])


def test_release_of_a_shared_run_ends_its_lease_only_for_its_attempt(
    settings: Settings, tid: str
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target_report(tid, "r1", "shared", owner=LeaseOwner("a2")).path
    cache.get_target(tid, "r2", "shared")
    # a stale attempt (a retry took the lease over): nothing
    assert cache.release(tid, "r1", "shared", attempt="a1") == Released(tid, "r1", "shared", 0)
    assert cache.release(tid, "r1", "shared", attempt="a2").to_dict() == {
        "target_id": tid,
        "run_id": "r1",
        "workspace_isolation": "shared",
        "leases_ended": 1,
        "removed": [],
    }
    assert [le.run_id for le in cache.index.all_leases()] == ["r2"] and Path(ws).is_dir()


# --- release_lease (the worker's sweep of closed workflows' leases) ---------------------------
def test_release_lease_releases_a_run_lease_with_its_run_directory_only_for_its_attempt(
    settings: Settings, tid: str
) -> None:
    cache = WorkspaceCache(settings)
    cache.get_target_report(tid, "r1", "isolated", owner=LeaseOwner("a2", "wf"))
    lease = cache.index.lease(f"{tid}/r1")
    assert lease is not None
    run_dir = cache.layout.run_dir(tid, "r1")
    stale = dataclasses.replace(lease, attempt="a1")
    assert cache.release_lease(stale) is False
    assert run_dir.is_dir() and cache.index.lease(lease.lease_id) == lease
    assert cache.release_lease(lease) is True
    assert not run_dir.exists() and cache.index.all_leases() == []


def test_release_lease_ends_a_shared_lease_only_for_its_attempt(
    settings: Settings, tid: str
) -> None:
    cache = WorkspaceCache(settings)
    ws = cache.get_target_report(tid, "r1", "shared", owner=LeaseOwner("a2", "wf")).path
    lease = cache.index.lease(f"{tid}/workspace#r1")
    assert lease is not None
    stale = dataclasses.replace(lease, attempt="a1")
    assert cache.release_lease(stale) is False
    assert cache.index.lease(lease.lease_id) == lease
    assert cache.release_lease(lease) is True
    assert cache.index.all_leases() == [] and Path(ws).is_dir()


def test_release_lease_leaves_a_lease_this_cache_does_not_take_to_its_ttl(
    settings: Settings, tid: str
) -> None:
    cache = WorkspaceCache(settings)
    cache.get_target(tid, "r1", "isolated")
    foreign = cache.index.new_lease(f"{tid}/elsewhere", tid, "r1", (f"{tid}/r1",))
    cache.index.add_lease(foreign)
    assert cache.release_lease(foreign) is False
    assert cache.layout.run_dir(tid, "r1").is_dir()
    assert sorted(le.lease_id for le in cache.index.all_leases()) == [
        f"{tid}/elsewhere",
        f"{tid}/r1",
    ]


# --- renew -----------------------------------------------------------------------------------
def test_renew_by_lease_id_or_workflow_counts_from_now(settings: Settings) -> None:
    cache = WorkspaceCache(settings)
    ttl = settings.cache_lease_ttl
    long_ago = time.time() - 10 * ttl
    for lid, owner in (
        ("t/r1", LeaseOwner("a", "wf")),
        ("t/r2", LeaseOwner("b", "wf")),
        ("t/r3", None),
    ):
        cache.index.add_lease(
            cache.index.new_lease(lid, "t", lid[2:], (lid,), now=long_ago, owner=owner)
        )
    assert cache.index.live_leases() == []
    before = time.time()
    assert cache.renew(workflow_id="wf") == 2
    assert [le.lease_id for le in cache.index.live_leases()] == ["t/r1", "t/r2"]
    assert cache.renew(lease_id="t/r3") == 1
    assert cache.renew(lease_id="t/none") == 0
    lives = cache.index.live_leases()
    assert len(lives) == 3 and all(le.expires >= before + ttl for le in lives)


# --- the lease a get records before it creates anything --------------------------------------
class LeaseAtDownload:
    """Hooks recording, at the first downloaded bytes, whether the run's lease is recorded."""

    def __init__(self) -> None:
        self.cache: WorkspaceCache | None = None
        self.tid = ""
        self.leased_at_download: list[bool] = []

    def reached(self, phase: Phase) -> None:
        if phase is Phase.DOWNLOAD and self.cache is not None:
            self.leased_at_download.append(self.cache.index.lease(f"{self.tid}/r1") is not None)


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write"])
def test_a_get_whose_first_lease_write_met_a_full_disk_records_it_before_downloading(
    settings: Settings, tid: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first lease write may be skipped on a full index (a hit is served without it); a
    miss records it before it creates anything, so gc never takes the directory it builds."""
    hooks = LeaseAtDownload()
    cache = WorkspaceCache(settings, hooks=hooks)
    hooks.cache, hooks.tid = cache, tid
    real_add, calls = cache.index.add_lease, []

    def full_once(lease: LeaseRecord) -> None:
        calls.append(lease.lease_id)
        if len(calls) == 1:
            raise CacheFullError(errno.ENOSPC, "No space left on device")
        real_add(lease)

    monkeypatch.setattr(cache.index, "add_lease", full_once)
    path = cache.get_target(tid, "r1", mode)
    assert hooks.leased_at_download == [True]
    assert calls == [f"{tid}/r1", f"{tid}/r1"]
    assert Path(path).is_dir() and cache.index.lease(f"{tid}/r1") is not None


def test_a_failed_get_that_cannot_end_its_lease_names_the_write_it_skipped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WorkspaceCache(settings)

    def full(*args: Any, **kwargs: Any) -> bool:
        raise CacheFullError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.index, "end_lease", full)
    with caplog.at_level(logging.DEBUG, "forgespace.cache.index"), pytest.raises(FileNotFoundError):
        cache.get_target("no-such-target", "r1", "isolated")
    assert any("skipped writing the cache index (end lease)" in m for m in said(caplog)), said(
        caplog
    )
