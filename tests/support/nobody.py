"""Run a Python snippet as the unprivileged user 65534 (nobody), for behaviour that differs
between root and an ordinary worker user (permissions, mode-000 trees).

``nobody_dir`` (fixture) is a fresh directory that user owns, under parents it can traverse
(mode 0711; pytest's own tmp_path lives under a 0700 directory). ``run_as_nobody`` runs
``python -c SNIPPET`` there under ``setpriv --reuid=65534 --regid=65534 --clear-groups``
with this interpreter (the venv must be readable by that user). Where that cannot work (not
root, no setpriv) the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A fresh directory owned by uid/gid 65534 whose parents that user can traverse."""
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found")
    base = Path(tempfile.mkdtemp(prefix="forgespace-nobody-"))
    try:
        os.chmod(base, 0o711)
        work = base / "w"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        yield work
    finally:
        _force_remove(base)


def _force_remove(path: Path) -> None:
    # Root removes whatever the child left, whatever its modes.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=120)


def run_as_nobody(
    snippet: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c snippet`` as uid/gid 65534 with no supplementary groups."""
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or "/")}
    child_env.update(env or {})
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            snippet,
        ],
        env=child_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
