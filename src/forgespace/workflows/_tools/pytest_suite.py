"""Run a target's own pytest suite with coverage inside its (writable) workspace copy.

The suite runs as ``python -m coverage run -m pytest`` in a subprocess whose working
directory is the workspace, with the worker's interpreter (nothing is installed: the
target's tests get what the worker's environment has, plus ``src/`` on the path when the
target uses that layout). pytest and coverage write their caches and reports into the
copy on purpose: ``.pytest_cache/``, ``__pycache__/``, ``.coverage`` and
``forgespace-reports/{junit.xml,coverage.json}``. That is why this tool is meant for
copy-on-write runs, whose copy nobody else sees.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from forgespace import sandbox
from forgespace.extras import require_extra
from forgespace.workflows._tools.common import (
    Heartbeat,
    Throttle,
    ToolError,
    pump_lines,
    sandbox_note,
    workspace_root,
)

REPORT_DIR = "forgespace-reports"
# Test files are not what coverage is meant to judge.
COVERAGE_OMIT = "*/tests/*,*/test_*.py,*/*_test.py,*/conftest.py"
_RESULT_WORD = re.compile(r"\s(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
# pytest exit codes that still mean "the suite ran" (0 all passed, 1 some failed,
# 5 nothing collected).
_RAN = {0, 1, 5}
_EXIT_MEANING = {2: "interrupted", 3: "internal error", 4: "usage error"}


def _args(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"pytest_args must be a string or a list of strings, got {value!r}")


def run_pytest_suite(
    workspace: str | os.PathLike[str],
    *,
    pytest_args: str | list[str] | None = None,
    timeout_seconds: float = 600,
    heartbeat: Heartbeat | None = None,
    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Run the workspace's pytest suite with coverage; return counts, coverage and failures.

    The suite runs in the process's sandbox (``forgespace.sandbox.current()``): its tests see
    their workspace and nothing else of the host's data, have no network and run as uid 65534.

    Result: ``{"tests", "passed", "failed", "errors", "skipped", "coverage_percent",
    "exit_code", "duration_seconds", "failures": [...], "reports": {...}}``.
    """
    require_extra("workflows", "the target's pytest suite", modules=("pytest", "coverage"))
    root = workspace_root(workspace)
    if not root.is_dir():
        raise ValueError("python_test_suite needs a directory target (a project with tests)")
    extra = _args(pytest_args)
    if isinstance(timeout_seconds, bool) or float(timeout_seconds) <= 0:
        raise ValueError(f"timeout_seconds must be a positive number, got {timeout_seconds!r}")
    reports = root / REPORT_DIR
    reports.mkdir(exist_ok=True)
    junit = reports / "junit.xml"
    cov_json = reports / "coverage.json"
    data_file = root / ".coverage"
    env = _suite_env(root, data_file)
    throttle = Throttle(heartbeat)
    box = sandbox.current()
    tool, tail, duration = _run_suite(
        box,
        _suite_command(root, data_file, junit, extra),
        root,
        env,
        limits=limits,
        throttle=throttle,
        timeout=float(timeout_seconds),
    )
    code = tool.proc.returncode
    if code not in _RAN or not junit.exists():
        raise _not_run_error(code, tool, tail)

    summary = parse_junit(junit)
    coverage = _coverage_json(box, data_file, cov_json, env, root, limits)
    done = {k: summary[k] for k in ("passed", "failed", "errors")}
    throttle({"phase": "done", **done}, force=True)
    return {
        **summary,
        "coverage_percent": coverage,
        "exit_code": code,
        "duration_seconds": round(duration, 3),
        "reports": {
            "junit_xml": f"{REPORT_DIR}/junit.xml",
            "coverage_json": f"{REPORT_DIR}/coverage.json" if coverage is not None else None,
        },
    }


def _not_run_error(code: int, tool: sandbox.ToolProcess, tail: collections.deque[str]) -> ToolError:
    """pytest did not run the tests (bad arguments, collection crash...): say so with its
    last output."""
    meaning = _EXIT_MEANING.get(code, "failed")
    return ToolError(
        f"pytest {meaning} (exit code {code}){sandbox_note(tool)}; last output:\n"
        + "\n".join(list(tail)[-30:])
    )


def _suite_env(root: Path, data_file: Path) -> dict[str, str]:
    # Make sure nothing reaches for the network, even if a conftest tries pip.
    env = sandbox.tool_env({"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    paths = [str(root / "src")] if (root / "src").is_dir() else []
    # Kept after the target's own folders: the worker may itself run from a PYTHONPATH.
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(root), *inherited])
    env["COVERAGE_FILE"] = str(data_file)
    return env


def _suite_command(root: Path, data_file: Path, junit: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "coverage",
        "run",
        f"--data-file={data_file}",
        f"--source={root}",
        f"--omit={COVERAGE_OMIT}",
        "-m",
        "pytest",
        "-v",
        # One broken test module should not hide the results of all the others.
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit2",
        *extra,
    ]


def _run_suite(
    box: sandbox.Sandbox,
    cmd: list[str],
    root: Path,
    env: dict[str, str],
    *,
    limits: sandbox.Limits,
    throttle: Throttle,
    timeout: float,
) -> tuple[sandbox.ToolProcess, collections.deque[str], float]:
    """Run pytest to its end, heartbeating how many tests are done; returns the ended tool,
    its last output lines and its duration. A ToolError when it ran out of time."""
    tail: collections.deque[str] = collections.deque(maxlen=80)
    counts = collections.Counter[str]()
    started = time.monotonic()
    tool = box.popen(cmd, workspace=root, writable=True, cwd=root, env=env, limits=limits)

    def on_line(line: str) -> None:
        tail.append(line)
        if m := _RESULT_WORD.search(line):
            counts[m.group(1)] += 1

    def on_tick() -> None:
        throttle(
            {
                "phase": "pytest",
                "tests_done": sum(counts.values()),
                "failed": counts["FAILED"] + counts["ERROR"],
                "elapsed_seconds": round(time.monotonic() - started, 1),
            }
        )

    timed_out = pump_lines(tool.proc, on_line, on_tick, deadline=started + timeout)
    tool.check_started(tail)
    tool.close()
    duration = time.monotonic() - started
    if timed_out:
        raise ToolError(f"the test suite did not finish within {timeout:g} s")
    return tool, tail, duration


def _coverage_json(
    box: sandbox.Sandbox,
    data_file: Path,
    out: Path,
    env: dict[str, str],
    root: Path,
    limits: sandbox.Limits,
) -> float | None:
    if not data_file.exists():
        return None
    proc = box.run(
        [
            sys.executable,
            "-m",
            "coverage",
            "json",
            f"--data-file={data_file}",
            "-o",
            str(out),
            "--quiet",
        ],
        workspace=root,
        writable=True,
        cwd=root,
        env=env,
        limits=limits,
        timeout=300,
    )
    if proc.returncode != 0 or not out.exists():
        # "No data to report" (nothing under --source ran) is not a failure of the suite.
        return None
    totals = json.loads(out.read_text()).get("totals", {})
    percent = totals.get("percent_covered")
    return round(float(percent), 2) if percent is not None else None


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and failed test ids from a JUnit XML report (pytest's xunit2 flavour)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    tests = failed = errors = skipped = 0
    failures: list[dict[str, str]] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            tests += 1
            test_id = "::".join(x for x in (case.get("classname", ""), case.get("name", "")) if x)
            for kind in ("failure", "error"):
                el = case.find(kind)
                if el is not None:
                    if kind == "failure":
                        failed += 1
                    else:
                        errors += 1
                    failures.append(
                        {
                            "test": test_id,
                            "kind": kind,
                            "message": (el.get("message") or "")[:500],
                        }
                    )
                    break
            else:
                if case.find("skipped") is not None:
                    skipped += 1
    return {
        "tests": tests,
        "passed": tests - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
        "failures": failures,
    }
