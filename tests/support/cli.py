"""Run the installed ``forgespace`` command as a user would, as root or as an unprivileged user.

``run_forgespace(env, *args, user=NOBODY)`` runs it through ``setpriv`` with uid/gid 65534 and
no supplementary groups; the venv and the source tree must be readable by that user (they are
under 0755 directories here). ``assert_one_line_error`` checks the contract for a user mistake:
the exit code, one ``error:`` line on stderr, no traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FORGESPACE = str(Path(sys.executable).with_name("forgespace"))
NOBODY = 65534


def cli_env(base: dict[str, str], **overrides: str) -> dict[str, str]:
    """``base`` with quiet logs and wide output (no wrapped error lines)."""
    return {**base, "FORGESPACE_LOG_LEVEL": "WARNING", "COLUMNS": "1000", **overrides}


def run_forgespace(
    env: dict[str, str], *args: str, user: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``forgespace ARGS`` with ``env``; ``user`` = a uid to drop to (gid the same)."""
    cmd = [FORGESPACE, *args]
    if user is not None:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) not found: cannot run as an unprivileged user")
        if os.geteuid() != 0:
            pytest.skip("running as another user needs root")
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], rc: int, *needles: str) -> str:
    """The command failed with ``rc``, printing one ``error:`` line (containing each of
    ``needles``) and no traceback; returns that line."""
    assert proc.returncode == rc, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def run_on_terminal(
    env: dict[str, str], *args: str, columns: int = 400, timeout: float = 60
) -> tuple[int, str]:
    """Run ``forgespace ARGS`` with stdout on a pseudo-terminal (as in an interactive shell:
    tables, not plain columns); (exit code, what it printed there). stderr is discarded."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    env = {**env, "COLUMNS": str(columns), "LINES": "100", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [FORGESPACE, *args], env=env, stdin=subprocess.DEVNULL, stdout=slave,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace").replace("\r\n", "\n")
    return rc, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # colours and cursor codes off
