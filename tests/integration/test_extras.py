"""Optional extras: the core works without them, and a command or tool that needs a missing one
says which `pip install` fixes it (one line, no traceback).

"Missing" is simulated the way Python itself treats a blocked module: the child process sets
``sys.modules[name] = None`` before the CLI starts, so ``import name`` raises ImportError
exactly as it would where the package is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import make_project
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from forgespace.config import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def forgespace_without(
    blocked: tuple[str, ...], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child where the ``blocked`` modules cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None\n"
        "from forgespace.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("run", ["security_assessment", str(EXAMPLES / "vulnerable_app")]),
        ("worker", []),
        ("workflows", ["--json"]),
    ],
)
def test_temporal_commands_without_the_extra_say_what_to_install(
    settings: Settings, settings_env, command: str, args: list[str]
) -> None:
    proc = forgespace_without(("temporalio",), settings_env(settings), command, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        f"forgespace {command} needs the Temporal extra: pip install 'forgespace[temporal]'"
        in lines[0]
    )
    assert "Traceback" not in proc.stderr
    # Nothing was started or uploaded on the way to the message.
    assert not Path(settings.storage_dir).exists()


def test_the_core_works_without_temporal_or_the_workflow_tools(
    settings: Settings, settings_env, tmp_path: Path
) -> None:
    blocked = ("temporalio", "pydantic", "jsonschema", "atheris", "bandit", "detect_secrets")
    env = settings_env(settings)
    project = make_project(tmp_path / "p", files=5, seed="extras")
    up = forgespace_without(blocked, env, "upload", str(project))
    assert up.returncode == 0, up.stderr
    target_id = up.stdout.strip().splitlines()[-1]
    got = forgespace_without(blocked, env, "get", target_id, "--isolation", "shared")
    assert got.returncode == 0, got.stderr
    workspace = Path(got.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in workspace.rglob("*") if p.is_file()) == sorted(
        p.name for p in project.rglob("*") if p.is_file()
    )
    status = forgespace_without(blocked, env, "cache", "status", "--json")
    assert status.returncode == 0, status.stderr


def _activities() -> list[tuple[str, object, str, dict]]:
    from forgespace.workflows.atheris_fuzzing.activities import atheris_fuzz
    from forgespace.workflows.python_test_suite.activities import python_test_suite_run
    from forgespace.workflows.secret_detection.activities import secret_detection_scan
    from forgespace.workflows.security_assessment.activities import security_assessment_scan

    return [
        ("atheris", atheris_fuzz, "fuzz_target", {"timeout_seconds": 5}),
        ("pytest", python_test_suite_run, "pytest_project", {}),
        ("coverage", python_test_suite_run, "pytest_project", {}),
        ("detect_secrets", secret_detection_scan, "vulnerable_app", {}),
        ("bandit", security_assessment_scan, "vulnerable_app", {}),
    ]


@pytest.mark.parametrize(
    ("module", "activity", "example", "params"),
    _activities(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_bundled_tool_without_its_package_fails_the_activity_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, activity, example: str, params: dict
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ApplicationError) as info:
        ActivityEnvironment().run(activity, str(EXAMPLES / example), params)
    assert info.value.non_retryable
    assert info.value.type == "MissingExtraError"
    assert "pip install 'forgespace[workflows]'" in str(info.value)
    assert module in str(info.value)
