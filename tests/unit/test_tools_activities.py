"""The bundled workflows' activities run without a server (temporalio's ActivityEnvironment)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from forgespace.workflows._tools.workflow_common import fit_payload, number_param
from forgespace.workflows.atheris_fuzzing.activities import atheris_fuzz
from forgespace.workflows.python_test_suite.activities import python_test_suite_run
from forgespace.workflows.secret_detection.activities import secret_detection_scan
from forgespace.workflows.security_assessment.activities import security_assessment_scan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_atheris_activity_heartbeats_live_stats(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(EXAMPLES / "fuzz_target", ws)
    env = ActivityEnvironment()
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.append(details[0])
    result = env.run(
        atheris_fuzz,
        str(ws),
        {"max_iterations": 5_000_000, "timeout_seconds": 30, "max_crashes": 1},
    )
    assert result["unique_crashes"] == 1
    assert beats and all(
        set(b) == {"executions", "exec_per_sec", "corpus_size", "crashes"} for b in beats
    )
    json.dumps(result)  # crosses Temporal as JSON


def test_cancelling_the_activity_stops_the_fuzzer(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_slow.py").write_text(
        "import time\n\ndef TestOneInput(data):\n    time.sleep(0.05)\n"
    )
    env = ActivityEnvironment()
    first = threading.Event()
    env.on_heartbeat = lambda *details: first.set()
    threading.Thread(target=lambda: first.wait(30) and env.cancel(), daemon=True).start()
    with pytest.raises(CancelledError):
        env.run(atheris_fuzz, str(ws), {"timeout_seconds": 120})
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(ws / "fuzz_slow.py").encode() not in cmdline


@pytest.mark.parametrize(
    ("activity_fn", "bad", "accepted"),
    [
        (atheris_fuzz, {"max_iteration": 5}, "max_iterations"),
        (security_assessment_scan, {"large_files": 5}, "large_file_bytes"),
        (secret_detection_scan, {"max_file_size": 5}, "max_file_bytes"),
        (python_test_suite_run, {"args": "-k x"}, "pytest_args"),
    ],
)
def test_unknown_parameters_are_non_retryable_errors_naming_the_accepted_ones(
    tmp_path: Path, activity_fn: Any, bad: dict[str, Any], accepted: str
) -> None:
    with pytest.raises(ApplicationError) as info:
        ActivityEnvironment().run(activity_fn, str(tmp_path), bad)
    assert info.value.non_retryable
    assert info.value.type == "ValueError"
    assert f"no parameter {next(iter(bad))!r}" in str(info.value)
    assert accepted in str(info.value)


def test_bad_values_and_tool_failures_are_non_retryable(tmp_path: Path) -> None:
    with pytest.raises(ApplicationError) as info:
        ActivityEnvironment().run(atheris_fuzz, str(tmp_path), {"max_iterations": -1})
    assert info.value.non_retryable and "max_iterations" in str(info.value)
    (tmp_path / "tests").mkdir()
    with pytest.raises(ApplicationError) as info:
        ActivityEnvironment().run(
            python_test_suite_run, str(tmp_path), {"pytest_args": "--no-such-flag"}
        )
    assert info.value.non_retryable and info.value.type == "ToolError"


def test_fit_payload_drops_findings_but_keeps_the_real_counts() -> None:
    findings = [{"message": "x" * 1000, "n": i} for i in range(3000)]
    result = {
        "findings": findings,
        "summary": {"total": 3000},
        "sarif": {"runs": [{"results": [{"ruleId": "R", "text": "y" * 500}] * 3000}]},
    }
    out = fit_payload(result, limit=200_000)
    assert len(json.dumps(out)) <= 200_000
    kept = out["truncated"]["findings_kept"]
    assert 0 < kept < 3000 and out["truncated"]["findings_total"] == 3000
    assert out["findings"] == findings[:kept]
    assert out["summary"]["total"] == 3000
    small = {"findings": [1, 2], "summary": {}}
    assert fit_payload(small) == {"findings": [1, 2], "summary": {}}


def test_number_param_never_raises_in_workflow_code() -> None:
    assert number_param({"timeout_seconds": 30}, "timeout_seconds", 60) == 30
    assert number_param({"timeout_seconds": "45"}, "timeout_seconds", 60) == 45
    for bad in ("soon", None, -5, float("nan"), [1]):
        assert number_param({"timeout_seconds": bad}, "timeout_seconds", 60) == 60
