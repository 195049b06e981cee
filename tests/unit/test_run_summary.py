"""What `forgespace run` reads from a run's result: findings, severities, crashes, tests."""

from __future__ import annotations

from typing import Any

import pytest

from forgespace.temporal.summary import (
    at_or_above,
    detail_lines,
    findings_of,
    results_location,
    severities,
    severity_counts,
    top_findings,
)


def sarif_result(level: str | None, uri: str, line: int, rule: str, text: str) -> dict[str, Any]:
    r: dict[str, Any] = {
        "ruleId": rule,
        "message": {"text": text},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": uri},
                    "region": {"startLine": line},
                }
            }
        ],
    }
    if level is not None:
        r["level"] = level
    return r


SCAN = {
    "sarif": {
        "runs": [
            {
                "results": [
                    sarif_result("note", "a.py", 1, "B101", "assert used"),
                    sarif_result("error", "b.py", 7, "B602", "shell=True\nsecond line"),
                    sarif_result(None, "c.py", 3, "B307", "eval"),  # SARIF default: warning
                ]
            }
        ]
    },
    # The SARIF wins over the list (it carries the levels a CI gate uses).
    "findings": [{"severity": "low"}],
    "results_location": {"json": "/r/results.json", "sarif": "/r/results.sarif"},
}


def test_sarif_levels_are_the_severities_and_the_most_severe_come_first() -> None:
    assert severities(SCAN, 3) == ["low", "high", "medium"]
    top = top_findings(SCAN, 2)
    assert [(f.severity, f.where, f.rule) for f in top] == [
        ("high", "b.py:7", "B602"),
        ("medium", "c.py:3", "B307"),
    ]
    assert top[0].message == "shell=True"  # first line only
    assert severity_counts(SCAN) == "1 high, 1 medium, 1 low"
    assert results_location(SCAN) == {"json": "/r/results.json", "sarif": "/r/results.sarif"}


@pytest.mark.parametrize(
    ("threshold", "hits"), [("high", 1), ("medium", 2), ("low", 3)]
)  # fmt: skip
def test_fail_on_counts_findings_at_or_above_the_threshold(threshold: str, hits: int) -> None:
    assert at_or_above(severities(SCAN, 3), threshold) == hits


def test_findings_without_a_severity_rank_high() -> None:
    crash = {
        "findings": [
            {
                "signature": "4ed37f13",
                "crash_file": ".atheris/crashes/crash-4ed37f13",
                "exception_type": "builtins.IndexError",
                "exception_message": "index out of range",
                "location": "header_parser.py:30",
                "input_size": 7,
            }
        ],
        "executions": 1000,
        "exec_per_sec": 250.0,
        "stopped": "timeout",
    }
    assert severities(crash, 1) == ["high"]
    assert at_or_above(severities(crash, 1), "high") == 1
    # A count without a list (a test suite's failures) is ranked high too.
    assert severities({"failed": 2}, 2) == ["high", "high"]
    assert severities({}, 0) == []
    lines = detail_lines(crash)
    assert lines[0] == (
        "crash 4ed37f13: builtins.IndexError: index out of range at header_parser.py:30; "
        "input .atheris/crashes/crash-4ed37f13 (7 bytes, base64 in the results)"
    )
    assert lines[1] == "fuzzing: 1000 executions, 250/s, stopped by timeout"


def test_listed_findings_use_their_own_fields() -> None:
    secrets = {
        "findings": [
            {"file": ".env", "line": 2, "type": "Secret Keyword"},
            {"file": "k.pem", "line": 1, "type": "Private Key", "severity": "critical"},
        ]
    }
    found = findings_of(secrets)
    assert [(f.severity, f.where, f.rule) for f in found] == [
        (None, ".env:2", "Secret Keyword"),
        ("high", "k.pem:1", "Private Key"),
    ]
    assert top_findings(secrets)[0].rule == "Private Key"  # ranked, then unranked (high)


def test_test_suite_lines_name_the_failing_tests_and_coverage() -> None:
    suite = {
        "tests": 5,
        "passed": 4,
        "failed": 1,
        "skipped": 0,
        "coverage_percent": 83.33,
        "failures": [{"test": "tests.test_stock::test_low", "message": "AssertionError: x\nmore"}],
    }
    assert detail_lines(suite) == [
        "tests: 4 passed, 1 failed, 0 skipped; coverage 83.3%",
        "  failed tests.test_stock::test_low: AssertionError: x",
    ]


@pytest.mark.parametrize("result", [None, 3, "text", [], {"findings": True}])
def test_other_shapes_have_nothing_to_list(result: Any) -> None:
    assert findings_of(result) == [] and detail_lines(result) == []
    assert results_location(result) == {}


def test_malformed_sarif_parts_are_skipped_and_the_rest_is_read() -> None:
    result = {
        "sarif": {
            "runs": [
                "not a run",
                {
                    "results": [
                        "not a result",
                        # A location without a physical one, then one with a file but no line.
                        {
                            "ruleId": "R1",
                            "level": "error",
                            "message": "plain text message",
                            "locations": [
                                {"logicalLocations": []},
                                {"physicalLocation": {"artifactLocation": {"uri": "a.py"}}},
                            ],
                        },
                        {"ruleId": "R2", "locations": ["garbage"], "message": {"text": "m"}},
                    ]
                },
            ]
        }
    }
    found = findings_of(result)
    assert [(f.severity, f.where, f.rule, f.message) for f in found] == [
        ("high", "a.py", "R1", "plain text message"),
        ("medium", "", "R2", "m"),
    ]


def test_listed_entries_that_are_not_findings_are_skipped() -> None:
    result = {"findings": ["text", {"path": "x.py", "kind": "leak", "title": "a leak"}, 3]}
    assert [(f.where, f.rule, f.message) for f in findings_of(result)] == [
        ("x.py", "leak", "a leak")
    ]


def test_failures_without_a_test_name_are_not_listed() -> None:
    suite = {
        "tests": 2,
        "passed": 0,
        "failed": 2,
        "failures": [{"message": "no name"}, "text", {"test": "t::b"}],
    }
    assert detail_lines(suite) == ["tests: 0 passed, 2 failed, 0 skipped", "  failed t::b"]


def test_a_results_location_given_as_one_path_is_the_json() -> None:
    assert results_location({"results_location": "/r/out.json"}) == {"json": "/r/out.json"}
    assert results_location({"results_location": ""}) == {}
    assert results_location({"results_location": {"json": "/r/j", "sarif": None}}) == {
        "json": "/r/j"
    }
