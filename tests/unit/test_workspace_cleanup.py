"""cleanup_cache refuses anything that is not a run directory of its mode, deleting nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import CleanupRefusedError


@pytest.fixture
def populated(settings: Settings, tmp_path: Path) -> tuple[WorkspaceCache, str]:
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=5))
    cache.get_target(tid, None, "shared")
    cache.get_target(tid, "iso", "isolated")
    cache.get_target(tid, "cow", "copy-on-write")
    return cache, tid


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".forgespace" not in p.parts}


def _outside(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "run"
    (victim / "workspace").mkdir(parents=True, exist_ok=True)
    return victim


REFUSED: list[tuple[str, str, Callable[[Path, str, Path], Path | str]]] = [
    ("isolated", "cache dir", lambda r, t, x: r),
    ("isolated", "cache dir trailing slash", lambda r, t, x: str(r) + "/"),
    ("isolated", "target dir", lambda r, t, x: r / t),
    ("isolated", "shared workspace", lambda r, t, x: r / t / "workspace"),
    ("isolated", "shared target", lambda r, t, x: r / t / "target"),
    ("isolated", "cow shared copy", lambda r, t, x: r / t / "shared"),
    ("isolated", "cow shared workspace", lambda r, t, x: r / t / "shared" / "workspace"),
    ("isolated", "inside a workspace", lambda r, t, x: r / t / "iso" / "workspace" / "pkg0"),
    ("isolated", "dotdot escape", lambda r, t, x: str(r / t / "iso") + "/../../.."),
    ("isolated", "bookkeeping", lambda r, t, x: r / ".forgespace"),
    ("isolated", "bookkeeping tmp", lambda r, t, x: r / ".forgespace" / "tmp"),
    ("isolated", "outside", lambda r, t, x: x),
    ("isolated", "relative outside", lambda r, t, x: os.path.relpath(x)),
    ("isolated", "empty", lambda r, t, x: ""),
    # siblings whose name starts with CACHE_DIR's ({CACHE_DIR}X{tid}/...) are outside it
    ("isolated", "sibling with the cache dir's prefix", lambda r, t, x: f"{r}X{t}/iso"),
    ("shared", "sibling with the cache dir's prefix", lambda r, t, x: f"{r}X{t}/workspace"),
    ("isolated", "copy-on-write run dir", lambda r, t, x: r / t / "cow"),
    ("copy-on-write", "isolated run dir", lambda r, t, x: r / t / "iso" / "workspace"),
    ("copy-on-write", "cow shared copy", lambda r, t, x: r / t / "shared"),
    ("copy-on-write", "target dir", lambda r, t, x: r / t),
    ("copy-on-write", "shared workspace", lambda r, t, x: r / t / "workspace"),
    ("shared", "run dir in shared mode", lambda r, t, x: r / t / "iso"),
    ("shared", "cow shared in shared mode", lambda r, t, x: r / t / "shared"),
    ("shared", "cache dir", lambda r, t, x: r),
    ("shared", "target dir", lambda r, t, x: r / t),
    ("isolated", "not a run id", lambda r, t, x: r / t / "-iso" / "workspace"),
]

# Why each is refused, as the error says it.
REASONS: dict[tuple[str, str], str] = {
    ("isolated", "cache dir"): "that is CACHE_DIR itself",
    ("isolated", "cache dir trailing slash"): "that is CACHE_DIR itself",
    ("isolated", "target dir"): "that is a whole target directory, not a run directory",
    ("isolated", "shared workspace"): "that is the shared-mode workspace of the target",
    ("isolated", "shared target"): "that is the shared-mode workspace of the target",
    ("isolated", "cow shared copy"): "that is the copy-on-write shared copy",
    ("isolated", "cow shared workspace"): "that is the copy-on-write shared copy",
    (
        "isolated",
        "inside a workspace",
    ): "a path inside a run's workspace; pass the run directory or its workspace",
    ("isolated", "dotdot escape"): "it is outside CACHE_DIR",
    ("isolated", "bookkeeping"): "'.forgespace' is not a target directory",
    ("isolated", "bookkeeping tmp"): "'.forgespace' is not a target directory",
    ("isolated", "outside"): "it is outside CACHE_DIR",
    ("isolated", "relative outside"): "it is outside CACHE_DIR",
    ("isolated", "empty"): "empty path",
    ("isolated", "sibling with the cache dir's prefix"): "it is outside CACHE_DIR",
    ("shared", "sibling with the cache dir's prefix"): "it is outside CACHE_DIR",
    (
        "isolated",
        "copy-on-write run dir",
    ): "that is a run directory of workspace_isolation 'copy-on-write'",
    (
        "copy-on-write",
        "isolated run dir",
    ): "that is a run directory of workspace_isolation 'isolated'",
    ("copy-on-write", "cow shared copy"): "that is the copy-on-write shared copy",
    ("copy-on-write", "target dir"): "that is a whole target directory, not a run directory",
    ("copy-on-write", "shared workspace"): "that is the shared-mode workspace of the target",
    ("shared", "run dir in shared mode"): "not the shared workspace or target of a target",
    ("shared", "cow shared in shared mode"): "not the shared workspace or target of a target",
    ("shared", "cache dir"): "that is CACHE_DIR itself",
    ("shared", "target dir"): "that is a whole target directory, not a run directory",
    ("isolated", "not a run id"): "'-iso' is not a run directory",
}


# What each mode accepts, as every refusal of that mode says it.
ACCEPTED = {
    "shared": "{CACHE_DIR}/{target_id}/workspace or {CACHE_DIR}/{target_id}/target",
    "isolated": "{CACHE_DIR}/{target_id}/{run_id}[/workspace|/target]",
    "copy-on-write": "{CACHE_DIR}/{target_id}/{run_id}[/workspace|/target]",
}


def refusal(raw: str, mode: str, why: str, root: Path) -> str:
    """The whole refusal message: what was refused and why, what is accepted, nothing lost."""
    return (
        f"refusing to clean up {raw!r} (workspace_isolation {mode!r}): {why}; "
        f"accepted: {ACCEPTED[mode]} inside {root}; nothing was deleted"
    )


@pytest.mark.parametrize(("mode", "case", "make"), REFUSED, ids=[f"{m}-{c}" for m, c, _ in REFUSED])
def test_refused_and_nothing_deleted(
    populated: tuple[WorkspaceCache, str],
    tmp_path: Path,
    mode: str,
    case: str,
    make: Callable[[Path, str, Path], Path | str],
) -> None:
    cache, tid = populated
    root = cache.layout.root
    outside = _outside(tmp_path)
    before = _snapshot(root)
    leases = cache.index.live_leases()
    path = make(root, tid, outside)
    with pytest.raises(CleanupRefusedError) as ei:
        cache.cleanup_cache(path, mode)
    # the refusal says what, why, what is accepted and that nothing was deleted
    assert str(ei.value) == refusal(os.fspath(path), mode, REASONS[(mode, case)], root)
    assert isinstance(ei.value, ValueError)
    assert _snapshot(root) == before
    assert (outside / "workspace").is_dir()
    assert cache.index.live_leases() == leases


def test_symlinks_refused(populated: tuple[WorkspaceCache, str], tmp_path: Path) -> None:
    cache, tid = populated
    root = cache.layout.root
    outside = _outside(tmp_path)
    # a link inside the cache that looks like a run directory but points outside
    (root / tid / "evil").symlink_to(outside)
    # a link outside the cache pointing at a real run directory
    alias = tmp_path / "alias"
    alias.symlink_to(root / tid / "iso")
    # a link to a whole target dir that looks like a target id
    (root / "alias-target").symlink_to(root / tid)
    before = _snapshot(root)
    real = os.path.realpath(root)
    links = {
        root / tid / "evil": f"{real}/{tid}/evil",
        root / tid / "evil" / "workspace": f"{real}/{tid}/evil",
        alias: None,  # outside CACHE_DIR (the link is not resolved)
        alias / "workspace": None,
        root / "alias-target" / "iso": f"{real}/alias-target",
    }
    for p, link in links.items():
        with pytest.raises(CleanupRefusedError) as ei:
            cache.cleanup_cache(p, "isolated")
        why = "it is outside CACHE_DIR" if link is None else f"{link} is a symbolic link"
        assert str(ei.value) == refusal(str(p), "isolated", why, root)
    assert _snapshot(root) == before
    assert (outside / "workspace").is_dir()
    assert (root / tid / "iso" / "workspace").is_dir()


def test_accepted_forms(populated: tuple[WorkspaceCache, str]) -> None:
    cache, tid = populated
    root = cache.layout.root
    cache.cleanup_cache(root / tid / "iso", "isolated")  # the run directory itself
    assert not (root / tid / "iso").exists()
    cache.cleanup_cache(str(root / tid / "cow" / "workspace") + "/", "copy-on-write")
    assert not (root / tid / "cow").exists()
    assert (root / tid / "shared" / "workspace").is_dir()
    assert (root / tid / "workspace").is_dir()
    assert os.listdir(cache.layout.trash_dir) == [], "rename-then-delete leaves no trash"
    assert cache.index.get(f"{tid}/iso") is None
    assert cache.index.get(f"{tid}/cow") is None


def test_the_target_forms_are_accepted_too(settings: Settings, tmp_path: Path) -> None:
    # {run}/target (isolated) and {tid}/target (shared) name the same run as their workspace
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=2))
    root = cache.layout.root
    cache.get_target(tid, "iso", "isolated")
    cache.cleanup_cache(root / tid / "iso" / "target", "isolated")
    assert not (root / tid / "iso").exists()
    assert cache.index.get(f"{tid}/iso") is None
    for form in ("workspace", "target"):
        rid = f"run-{form}"
        cache.get_target(tid, rid, "shared")
        lease = f"{tid}/workspace#{rid}"
        assert cache.index.lease(lease) is not None
        cache.cleanup_cache(root / tid / form, "shared", run_id=rid)
        assert cache.index.lease(lease) is None  # the run's lease ended
        assert (root / tid / "workspace").is_dir()  # shared removes nothing
