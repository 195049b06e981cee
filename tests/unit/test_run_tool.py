"""``forgespace_run_tool`` outside Temporal (``run_tool_sync``): a workflow's own command runs
in its workspace's sandbox; its exit code and output come back, a timeout kills it and says so,
its limits hold, and a bad request is refused before anything starts, naming what is wrong."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.userns import userns_refusal

from forgespace import sandbox
from forgespace.config import Settings
from forgespace.temporal.api import ToolRequest
from forgespace.temporal.tools import run_tool_sync


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A writable workspace outside any cache, with this process's sandbox set to bwrap."""
    refusal = userns_refusal()
    if refusal:
        pytest.skip(f"user namespaces are refused here: {refusal}")
    saved = (sandbox._current, sandbox._probed)
    sandbox._current = sandbox._probed = None
    settings = Settings.from_env({"CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    assert sandbox.configure(settings.with_(sandbox="bwrap")).active
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    yield ws
    sandbox._current, sandbox._probed = saved


def request(ws: Path, *argv: str, **kw: object) -> ToolRequest:
    return ToolRequest(workspace=str(ws), workspace_isolation="isolated", argv=list(argv), **kw)  # type: ignore[arg-type]


def test_a_command_runs_sandboxed_in_its_workspace_with_its_output(workspace: Path) -> None:
    code = (
        "import os, sys; print(os.getcwd()); print(os.environ['GREETING']); "
        "open('out.txt', 'w').write('made'); sys.stderr.write('x' * 5000); sys.exit(3)"
    )
    got = run_tool_sync(
        request(workspace, "python", "-c", code, cwd="sub", env={"GREETING": "hi"},
                output_bytes=100)
    )  # fmt: skip
    assert got.sandboxed and got.exit_code == 3 and not got.timed_out
    assert got.stdout.splitlines() == [str(workspace / "sub"), "hi"]
    assert got.stderr == "x" * 100  # the last output_bytes only
    assert (workspace / "sub" / "out.txt").read_text() == "made"


def test_a_command_past_its_timeout_is_killed_and_reported(workspace: Path) -> None:
    started = time.monotonic()
    got = run_tool_sync(
        request(workspace, "python", "-c", "import time; print('started', flush=True); "
                "time.sleep(600)", timeout_seconds=1.5)
    )  # fmt: skip
    assert got.timed_out and got.exit_code is None
    assert got.stdout == "started\n"
    assert time.monotonic() - started < 300  # killed, not waited for (any machine speed)


def test_the_requested_limits_hold(workspace: Path) -> None:
    code = "open('big', 'wb').write(b'x' * 200_000)"
    got = run_tool_sync(request(workspace, "python", "-c", code, limits={"file_size": 65536}))
    assert got.exit_code != 0 and "File too large" in got.stderr  # RLIMIT_FSIZE: EFBIG
    assert (workspace / "big").stat().st_size <= 65536


LIMIT = "must be a positive integer or null, got"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"argv": []}, "argv must be a non-empty list of non-empty strings"),
        ({"argv": ["python", ""]}, "argv must be a non-empty list of non-empty strings"),
        ({"cwd": "../elsewhere"}, "cwd '../elsewhere' must be a path relative to the workspace"),
        ({"cwd": "/etc"}, "cwd '/etc' must be a path relative to the workspace"),
        ({"timeout_seconds": 0}, "timeout_seconds must be positive, got 0"),
        ({"limits": {"memory": 1}}, "unknown sandbox limit(s) memory; accepted: address_space"),
        ({"limits": {"processes": 0}}, f"sandbox limit processes {LIMIT} 0"),
        ({"limits": {"cpu_seconds": True}}, f"sandbox limit cpu_seconds {LIMIT} True"),
        ({"limits": {"file_size": "1M"}}, f"sandbox limit file_size {LIMIT} '1M'"),
        ({"workspace_isolation": "private"}, "invalid workspace_isolation 'private'"),
    ],
)  # fmt: skip
def test_a_bad_request_is_refused_before_anything_runs(
    workspace: Path, changes: dict[str, object], message: str
) -> None:
    marker = workspace / "ran"
    fields = {
        "workspace_isolation": "isolated",
        "argv": ["python", "-c", f"open({str(marker)!r}, 'w')"],
        **changes,
    }
    req = ToolRequest(workspace=str(workspace), **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as err:
        run_tool_sync(req)
    assert message in str(err.value)
    assert not marker.exists()


def test_a_program_other_than_python_runs_as_named(workspace: Path) -> None:
    (workspace / "data.txt").write_text("one\ntwo\n")
    got = run_tool_sync(request(workspace, "wc", "-l", "data.txt"))
    assert got.exit_code == 0 and got.stdout.split() == ["2", "data.txt"]
