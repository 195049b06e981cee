"""Workflow tools cannot reach past their workspace: the attacks, through real workflows.

A target's own pytest suite (``python_test_suite``, copy-on-write) and an atheris fuzz target
(``atheris_fuzzing``, isolated) try to read the cache index, list CACHE_DIR, read another
run's workspace and a host file, write outside their workspace, connect to a socket the test
listens on, and run as root. Each probe passes only when denied (checked inside); the test
then checks from the host that nothing was written and no connection arrived. A shared run
of ``ws.run_tool`` cannot write into its workspace although the worker is root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.temporal import FIXTURE_WORKFLOWS, in_process_worker
from support.userns import userns_refusal
from temporalio.client import Client

from forgespace import sandbox
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.runner import RunJob, run_job

pytestmark = pytest.mark.integration

SANDBOX_FIXTURES = FIXTURE_WORKFLOWS / "_sandbox"
DENIED = {"Read-only file system", "Permission denied"}
PROBES = ("index", "cache_listing", "other_run", "host_file", "write_outside", "network", "uid")

# The probes, shared by the pytest suite and the fuzz target: each returns None when denied,
# or what it reached.
PROBE_CODE = """
import json, os, pathlib, socket

CFG = json.loads((pathlib.Path(__file__).parent / "probe_config.json").read_text())


def _reached(fn):
    try:
        return repr(fn())[:200]
    except OSError:
        return None


def probe_index():
    return _reached(lambda: open(CFG["index"], "rb").read(16))


def probe_cache_listing():
    try:
        names = os.listdir(CFG["cache_dir"])
    except OSError:
        return None
    leaked = [n for n in names if n == ".forgespace" or n == CFG["other_target"]]
    return repr(leaked) if leaked else None


def probe_other_run():
    return _reached(lambda: os.listdir(CFG["other_workspace"]))


def probe_host_file():
    return _reached(lambda: open(CFG["sentinel"]).read())


def probe_write_outside():
    for p in CFG["write_targets"]:
        if _reached(lambda: open(p, "w").write("escaped")) is not None:
            return p
    return None


def probe_network():
    return _reached(lambda: socket.create_connection(("127.0.0.1", CFG["port"]), timeout=10))


def probe_uid():
    return "running as root" if os.geteuid() == 0 else None


PROBES = {name[len("probe_"):]: fn for name, fn in sorted(globals().items())
          if name.startswith("probe_")}
"""

PYTEST_SUITE = """
import pytest
from escape_probes import PROBES


@pytest.mark.parametrize("name", sorted(PROBES))
def test_denied(name):
    assert PROBES[name]() is None, f"{name} reached past the workspace"
"""

FUZZ_TARGET = """
import json
from escape_probes import PROBES


def TestOneInput(data):
    # Reports through a crash: its message carries what every probe reached (None = denied).
    raise RuntimeError(json.dumps({name: fn() for name, fn in PROBES.items()}))
"""


@pytest.fixture
def sandboxed(settings: Settings, temporal_server: DevServer) -> Settings:
    """Settings that require bubblewrap, pointed at the session's dev server."""
    refusal = userns_refusal()
    if refusal:
        pytest.skip(f"user namespaces are refused here: {refusal}")
    return dataclasses.replace(
        settings,
        sandbox="bwrap",
        temporal_address=temporal_server.address,
        temporal_namespace=temporal_server.namespace,
    )


@dataclasses.dataclass
class Attack:
    listener: socket.socket
    sentinel: Path
    write_targets: list[Path]
    other_workspace: Path
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@pytest.fixture
def attack(sandboxed: Settings, tmp_path: Path) -> Iterator[Attack]:
    """Another target's run workspace, a host sentinel file and a listening socket."""
    other_src = tmp_path / "other-src"
    other_src.mkdir()
    (other_src / "private.py").write_text("KEY = 'other run data'\n")
    other_tid = open_store(sandboxed).upload_target(other_src)
    other_ws = Path(
        WorkspaceCache(sandboxed).get_target(other_tid, "other-run", workspace_isolation="isolated")
    )
    host = tmp_path / "host"
    host.mkdir()
    sentinel = host / "sentinel.txt"
    sentinel.write_text("host secret")
    cache = sandboxed.cache_dir
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    a = Attack(
        listener=listener,
        sentinel=sentinel,
        write_targets=[
            cache / "escaped",
            cache / ".forgespace" / "escaped",
            other_ws / "escaped",
            host / "escaped",
        ],
        other_workspace=other_ws,
    )
    a.config = {
        "index": str(cache / ".forgespace" / "index.sqlite"),
        "cache_dir": str(cache),
        "other_target": other_tid,
        "other_workspace": str(other_ws),
        "sentinel": str(sentinel),
        "write_targets": [str(p) for p in a.write_targets],
        "port": listener.getsockname()[1],
    }
    assert (cache / ".forgespace" / "index.sqlite").exists()
    with listener:
        yield a


def check_from_host(a: Attack) -> None:
    """Nothing the probes tried reached the host."""
    assert not any(p.exists() for p in a.write_targets)
    assert a.sentinel.read_text() == "host secret"
    assert sorted(p.name for p in a.other_workspace.iterdir()) == ["private.py"]
    with pytest.raises(BlockingIOError):
        a.listener.accept()  # no connection ever arrived


def make_target(root: Path, a: Attack, files: dict[str, str]) -> Path:
    root.mkdir()
    (root / "escape_probes.py").write_text(PROBE_CODE)
    (root / "probe_config.json").write_text(json.dumps(a.config))
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def run_bundled(settings: Settings, task_queue: str, job: RunJob) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        assert settings.temporal_address
        client = await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
        async with in_process_worker(
            settings, client, task_queue, workflows_dirs=job.workflows_dirs, bundled=job.bundled
        ) as info:
            assert info.sandbox.startswith("sandbox: bubblewrap"), info.sandbox
            return await run_job(settings, job)

    return asyncio.run(main())


def test_a_targets_test_suite_cannot_reach_past_its_workspace(
    sandboxed: Settings, attack: Attack, tmp_path: Path, task_queue: str
) -> None:
    target = make_target(tmp_path / "suite", attack, {"test_escape.py": PYTEST_SUITE})
    job = RunJob(workflow="python_test_suite", path=target, runs=1, task_queue=task_queue)

    report = run_bundled(sandboxed, task_queue, job)

    [run] = report["runs"]
    assert run["status"] == "completed", run["error"]
    result = run["result"]
    assert result["failures"] == [], result["failures"]
    assert (result["tests"], result["passed"]) == (len(PROBES), len(PROBES))
    assert sandbox.current().active
    check_from_host(attack)
    # The suite's reports were written as uid 65534 inside and removed by the worker after.
    assert result["reports"]["junit_xml"] == "forgespace-reports/junit.xml"
    assert not Path(run["workspace"]).exists()


def test_an_atheris_target_cannot_reach_past_its_workspace(
    sandboxed: Settings, attack: Attack, tmp_path: Path, task_queue: str
) -> None:
    target = make_target(tmp_path / "fuzz", attack, {"fuzz_escape.py": FUZZ_TARGET})
    job = RunJob(
        workflow="atheris_fuzzing",
        path=target,
        runs=1,
        params={"max_iterations": 1000, "timeout_seconds": 60, "max_crashes": 1},
        task_queue=task_queue,
    )

    report = run_bundled(sandboxed, task_queue, job)

    [run] = report["runs"]
    assert run["status"] == "completed", run["error"]
    [finding] = run["result"]["findings"]
    assert finding["exception_type"] == "builtins.RuntimeError"
    reached = json.loads(finding["exception_message"])
    assert set(reached) == set(PROBES)
    assert reached == dict.fromkeys(PROBES), f"probes reached past the workspace: {reached}"
    # The crash input was written inside the workspace (as uid 65534) and read by the worker.
    assert finding["crash_file"].startswith(".atheris/crashes/")
    check_from_host(attack)


def test_a_tool_cannot_write_into_a_shared_workspace_although_the_worker_is_root(
    sandboxed: Settings, tmp_path: Path, task_queue: str
) -> None:
    assert os.geteuid() == 0 or pytest.skip("the point is that root bypasses the file modes")
    src = tmp_path / "proj"
    src.mkdir()
    (src / "code.py").write_text("x = 1\n")
    write = (
        "import os\n"
        "for p in ('new.txt', 'code.py'):\n"
        "    try:\n"
        "        open(p, 'a').write('x')\n"
        "    except OSError as e:\n"
        "        print(p, e.strerror)\n"
        "print(os.geteuid())\n"
    )
    job = RunJob(
        workflow="fs_run_tool",
        path=src,
        runs=1,
        params={"argv": ["python", "-c", write]},
        task_queue=task_queue,
        workflows_dirs=(SANDBOX_FIXTURES,),
        bundled=False,
    )

    report = run_bundled(sandboxed, task_queue, job)

    [run] = report["runs"]
    assert report["workspace_isolation"] == "shared"
    assert run["status"] == "completed", run["error"]
    out = run["result"]
    assert out["sandboxed"] is True and out["exit_code"] == 0
    lines = out["stdout"].splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines[:2]] == ["new.txt", "code.py"]
    # Inside, the mount refuses (or, for the 0444 file, the mode does: no capability
    # overrides it there); outside, root would have written both.
    assert all(ln.split(" ", 1)[1] in DENIED for ln in lines[:2]), lines
    assert lines[2] == "65534"
    shared = Path(run["workspace"])
    assert sorted(p.name for p in shared.iterdir()) == ["code.py"]
    assert (shared / "code.py").read_text() == "x = 1\n"
