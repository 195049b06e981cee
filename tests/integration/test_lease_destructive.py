"""Destructive paths respect leases (issue 12, item 5): repairing a tampered shared workspace
re-extracts beside it and never empties the directory a leased run works in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.procs import make_project, tree_digest

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.layout import RETIRED_PREFIX


def _get_in_another_process(settings: Settings, tid: str, rid: str) -> str:
    code = (
        "from forgespace import Settings, WorkspaceCache\n"
        f"print(WorkspaceCache(Settings.from_env()).get_target({tid!r}, {rid!r}, 'shared'))\n"
    )
    env = {
        **os.environ,
        "CACHE_DIR": str(settings.cache_dir),
        "STORAGE_DIR": str(settings.storage_dir),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, timeout=60, capture_output=True
    )
    return out.stdout.decode().strip().splitlines()[-1]


def _tamper(ws: Path) -> None:
    os.chmod(ws, 0o755)  # what a run running as root could do
    (ws / "dropped-by-run").write_text("x")


def test_repair_of_a_leased_workspace_never_empties_the_runs_directory(
    settings: Settings, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", files=10)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, "a", "shared"))
    cwd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)  # run a works in there
    try:
        _tamper(ws)
        assert _get_in_another_process(settings, tid, "b") == str(ws)
        # run a's directory still holds its files; the path serves the repaired copy
        assert "run.sh" in os.listdir(cwd)
        assert tree_digest(ws) == tree_digest(project)
        assert not (ws / "dropped-by-run").exists()
    finally:
        os.close(cwd)
    target_dir = cache.layout.target_dir(tid)
    assert any(n.startswith(RETIRED_PREFIX) for n in os.listdir(target_dir))
    cache.gc()
    assert any(n.startswith(RETIRED_PREFIX) for n in os.listdir(target_dir)), "still leased"
    cache.cleanup_cache(ws, "shared", run_id="a")
    cache.cleanup_cache(ws, "shared", run_id="b")
    cache.gc()
    assert sorted(os.listdir(target_dir)) == ["target", "workspace"]
    assert cache.verify_shared(tid) == []


def test_repair_of_an_unleased_workspace_leaves_nothing_aside(
    settings: Settings, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", files=10)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, None, "shared"))
    _tamper(ws)
    assert cache.repair_shared(tid)
    assert sorted(os.listdir(cache.layout.target_dir(tid))) == ["target", "workspace"]
    assert tree_digest(ws) == tree_digest(project)
