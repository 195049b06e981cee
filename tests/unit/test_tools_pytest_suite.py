"""python_test_suite tool: the target's own suite runs in its copy, counts and coverage right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from forgespace.workflows._tools.common import ToolError, tree_digest
from forgespace.workflows._tools.pytest_suite import run_pytest_suite

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytest_project"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    shutil.copytree(EXAMPLE, ws)
    return ws


def test_counts_coverage_and_reports_written_into_the_copy(project: Path) -> None:
    original = tree_digest(EXAMPLE)
    result = run_pytest_suite(project)
    assert (result["tests"], result["passed"], result["failed"], result["errors"]) == (5, 4, 1, 0)
    assert result["exit_code"] == 1
    assert [f["test"] for f in result["failures"]] == [
        "tests.test_stock::test_low_stock_includes_threshold"
    ]
    # export_csv is never called: coverage is real, not 0 and not 100.
    assert 50 < result["coverage_percent"] < 100
    report = json.loads((project / result["reports"]["coverage_json"]).read_text())
    assert round(report["totals"]["percent_covered"], 2) == result["coverage_percent"]
    assert "src/inventory/stock.py" in report["files"]
    assert not any("tests/" in name for name in report["files"])
    assert (project / result["reports"]["junit_xml"]).is_file()
    # The suite wrote its caches into the copy, and only there.
    assert (project / ".pytest_cache").is_dir()
    assert (project / ".coverage").is_file()
    assert tree_digest(EXAMPLE) == original


def test_pytest_args_select_tests(project: Path) -> None:
    result = run_pytest_suite(project, pytest_args="-k remove")
    assert (result["tests"], result["passed"], result["failed"]) == (2, 2, 0)
    assert result["exit_code"] == 0


def test_collection_errors_are_counted(project: Path) -> None:
    (project / "tests" / "test_broken.py").write_text("import not_a_module_anywhere\n")
    result = run_pytest_suite(project)
    # The broken module is an error; the other modules still ran.
    assert (result["passed"], result["failed"], result["errors"]) == (4, 1, 1)
    assert any("test_broken" in f["test"] for f in result["failures"])


def test_usage_error_and_timeout_are_tool_errors(project: Path) -> None:
    with pytest.raises(ToolError, match="usage error"):
        run_pytest_suite(project, pytest_args=["--no-such-option"])
    (project / "tests" / "test_slow.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(60)\n"
    )
    with pytest.raises(ToolError, match="did not finish within 3 s"):
        run_pytest_suite(project, timeout_seconds=3)


def test_bad_parameters(project: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pytest_args"):
        run_pytest_suite(project, pytest_args=[1, 2])  # type: ignore[list-item]
    single = tmp_path / "single.py"
    single.write_text("x = 1\n")
    with pytest.raises(ValueError, match="directory target"):
        run_pytest_suite(single)


@pytest.mark.parametrize("bad", [0, -1, True])
def test_a_bad_timeout_is_refused_before_the_suite_runs(project: Path, bad: object) -> None:
    with pytest.raises(ValueError, match=f"timeout_seconds must be a positive number, got {bad}"):
        run_pytest_suite(project, timeout_seconds=bad)  # type: ignore[arg-type]
    assert not (project / ".coverage").exists()


def test_skipped_tests_are_counted_apart_from_passed_ones(project: Path) -> None:
    (project / "tests" / "test_skips.py").write_text(
        "import pytest\n\n@pytest.mark.skip(reason='later')\ndef test_later():\n    pass\n\n"
        "def test_now():\n    pass\n"
    )
    result = run_pytest_suite(project)
    assert (result["tests"], result["passed"], result["failed"], result["skipped"]) == (7, 5, 1, 1)
