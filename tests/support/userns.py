"""Whether this host lets bubblewrap make an unprivileged-uid user namespace (the sandbox tests
skip, with the reason, only where the kernel refuses it; a missing bwrap is a failure:
`.ci/run` installs it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def userns_refusal() -> str | None:
    """Why this host refuses an unprivileged-uid user namespace, or None when it works."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.fail("bwrap is missing: install bubblewrap (.ci/run does)")
    proc = subprocess.run(
        [bwrap, "--unshare-user", "--uid", "65534", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return None if proc.returncode == 0 else proc.stderr.strip() or f"exit {proc.returncode}"
