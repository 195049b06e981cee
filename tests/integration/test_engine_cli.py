"""The engine's CLI: `forgespace get`, `cleanup` and `demo` as real commands."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration
FORGESPACE = str(Path(sys.executable).with_name("forgespace"))


@pytest.mark.slow
def test_cli_get_prints_path_on_last_line(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", files=5)
    tid = WorkspaceCache(settings).store.upload_target(project)
    exe = [FORGESPACE]
    cmd = [*exe, "get", tid, "--run-id", "r1", "--isolation", "copy-on-write"]
    out = subprocess.run(
        cmd, env=settings_env(settings), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert path == str(settings.cache_dir / tid / "r1" / "workspace")
    assert "Cache MISS" in out.stderr
    bad = subprocess.run(
        [*exe, "cleanup", str(settings.cache_dir), "--isolation", "isolated"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "refusing" in bad.stderr
    ok = subprocess.run(
        [*exe, "cleanup", path, "--isolation", "copy-on-write"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert not Path(path).exists()


def test_demo_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "STORAGE_", "S3_"))}
    env.update({"HOME": str(tmp_path), "XDG_CACHE_HOME": "", "XDG_DATA_HOME": ""})
    out = subprocess.run([FORGESPACE, "demo"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [
        line.split() for line in out.stdout.splitlines() if line.startswith(("iso", "sha", "copy"))
    ]
    got = [(r[0], r[2]) for r in rows]
    assert got == [
        ("isolated", "downloaded"),
        ("isolated", "downloaded"),
        ("shared", "downloaded"),
        ("shared", "from-cache"),
        # copy-on-write copies the download the shared runs already verified
        ("copy-on-write", "from-cache"),
        ("copy-on-write", "from-cache"),
    ]
    cache_dir = tmp_path / ".cache" / "forgespace"
    for r in rows:
        assert r[-1].startswith(str(cache_dir))
        assert r[3] == "4"  # the demo project's files
    # runs were cleaned up; the shared workspace and the copy-on-write shared copy stay
    (tid_dir,) = [d for d in cache_dir.iterdir() if d.name != ".forgespace"]
    assert sorted(p.name for p in tid_dir.iterdir()) == ["shared", "target", "workspace"]
