"""`forgespace upload PATH` as a user runs it: a real process, settings from the environment."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from support.s3server import env_for

from forgespace.config import Settings
from forgespace.layout import validate_id
from forgespace.storage import open_store

pytestmark = pytest.mark.integration

FORGESPACE = str(Path(sys.executable).with_name("forgespace"))


def run_cli(args: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORGESPACE, *args],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_upload_prints_the_id_on_the_last_line(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    tree = tmp_path / "project"
    tree.mkdir()
    (tree / "main.c").write_text("int main(void) { return 0; }\n")
    proc = run_cli(["upload", str(tree)], any_store_settings)
    assert proc.returncode == 0, proc.stderr
    tid = proc.stdout.strip().splitlines()[-1]
    assert validate_id(tid) == tid and tid.startswith("tree-")  # a content id
    info = open_store(any_store_settings).stat_target(tid)
    assert info.size > 0 and info.sha256 is not None


def test_upload_of_a_missing_path_fails_clearly(settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    proc = run_cli(["upload", str(missing)], settings)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert str(missing) in proc.stderr and "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not settings.storage_dir.exists() or list(settings.storage_dir.iterdir()) == []


def _big_file(tmp_path: Path) -> Path:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(40 * 1024 * 1024)  # sparse: cheap to make, still 40 MB to upload
    return big


def test_no_progress_bar_when_stderr_is_not_a_terminal(settings: Settings, tmp_path: Path) -> None:
    proc = run_cli(["upload", str(_big_file(tmp_path))], settings)
    assert proc.returncode == 0, proc.stderr
    assert "━" not in proc.stderr and "\r" not in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1


def test_progress_bar_on_a_terminal_for_a_large_upload(settings: Settings, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    env = env_for(settings)
    env.update({"COLUMNS": "120", "TERM": "xterm"})
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [FORGESPACE, "upload", str(_big_file(tmp_path))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        seen += data
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert b"uploading to local store" in seen
    tid = out.strip().splitlines()[-1]
    # stdout stays clean: the bar went to stderr only
    assert validate_id(tid) == tid and tid.startswith(("tree-", "file-"))
