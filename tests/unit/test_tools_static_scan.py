"""security_assessment tool: bandit + file scanner, SARIF 2.1.0, workspace left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from forgespace.workflows._tools.common import tree_digest
from forgespace.workflows._tools.static_scan import assess, scan_files

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vulnerable_app"
PLANTED_SECRETS = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "hunter2-not-a-real-password",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    shutil.copytree(EXAMPLE, ws)
    return ws


def check_sarif(log: dict[str, Any]) -> None:
    """The SARIF 2.1.0 structure code-scanning consumers rely on."""
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    assert log["runs"]
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert driver["name"]
        rule_ids = [r["id"] for r in driver["rules"]]
        assert len(rule_ids) == len(set(rule_ids))
        for r in run["results"]:
            assert r["ruleId"] in rule_ids
            assert rule_ids[r["ruleIndex"]] == r["ruleId"]
            assert r["level"] in {"error", "warning", "note", "none"}
            assert r["message"]["text"]
            loc = r["locations"][0]["physicalLocation"]
            assert not loc["artifactLocation"]["uri"].startswith("/")
            if "region" in loc:
                assert loc["region"]["startLine"] >= 1
    json.dumps(log)  # JSON-able


def test_bandit_and_file_scanner_find_the_planted_problems(app: Path) -> None:
    result = assess(app)
    bandit = {(f["rule_id"], f["file"]) for f in result["findings"] if f["tool"] == "bandit"}
    for rule in ("B602", "B307", "B301", "B324", "B201"):
        assert (rule, "app/handlers.py") in bandit
    files = {f["file"]: f for f in result["findings"] if f["tool"] == "forgespace-file-scanner"}
    assert set(files) == {"deploy/id_rsa", ".env"}
    assert files["deploy/id_rsa"]["severity"] == "high"
    digest = hashlib.sha256((app / "deploy" / "id_rsa").read_bytes()).hexdigest()
    assert files["deploy/id_rsa"]["sha256"] == digest
    summary = result["summary"]
    assert summary["total"] == len(result["findings"])
    assert sum(summary["by_severity"].values()) == summary["total"]
    assert summary["by_severity"]["high"] >= 3
    bandit_count = sum(1 for f in result["findings"] if f["tool"] == "bandit")
    assert summary["by_tool"]["bandit"] == bandit_count


def test_sarif_structure_and_locations(app: Path) -> None:
    log = assess(app)["sarif"]
    check_sarif(log)
    by_tool = {run["tool"]["driver"]["name"]: run for run in log["runs"]}
    assert set(by_tool) == {"bandit", "forgespace-file-scanner"}
    shell = [r for r in by_tool["bandit"]["results"] if r["ruleId"] == "B602"]
    assert shell and shell[0]["level"] == "error"
    loc = shell[0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "app/handlers.py"
    lines = (app / "app" / "handlers.py").read_text().splitlines()
    assert "shell=True" in lines[loc["region"]["startLine"] - 1]


def test_the_workspace_is_byte_for_byte_unchanged(app: Path) -> None:
    before = tree_digest(app)
    assess(app)
    assert tree_digest(app) == before


def test_hard_coded_passwords_are_masked_in_bandit_messages(app: Path) -> None:
    text = json.dumps(assess(app))
    for secret in PLANTED_SECRETS:
        assert secret not in text


def test_world_writable_and_large_binary_files(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "ok.txt").write_text("fine\n")
    (ws / "open.sh").write_text("echo hi\n")
    os.chmod(ws / "open.sh", 0o666)
    (ws / "blob.bin").write_bytes(b"\0" * 4096)
    (ws / "big.txt").write_text("x" * 4096)  # large but text: not flagged
    result = assess(ws, large_file_bytes=1024)
    rules = sorted((f["rule_id"], f["file"]) for f in result["findings"])
    assert rules == [("FS002", "open.sh"), ("FS003", "blob.bin")]
    check_sarif(result["sarif"])


def test_bad_parameter_is_refused(app: Path) -> None:
    with pytest.raises(ValueError, match="large_file_bytes"):
        assess(app, large_file_bytes=0)


def test_world_writable_directories_are_flagged_without_a_digest(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "drop").mkdir(parents=True)
    os.chmod(ws / "drop", 0o777)
    (ws / "private").mkdir()
    findings, scanned = scan_files(ws, large_file_bytes=1024)
    assert scanned == 0
    assert [(f["rule_id"], f["file"], f["message"], f["sha256"]) for f in findings] == [
        ("FS002", "drop", "directory is world-writable (mode 777)", None)
    ]


def test_a_single_file_target_is_named_by_its_file_in_every_finding(tmp_path: Path) -> None:
    # Stored single-file targets are named "target": bandit and the file scanner both say so.
    target = tmp_path / "t" / "target"
    target.parent.mkdir()
    target.write_text("import subprocess\nsubprocess.call('ls', shell=True)\n")
    os.chmod(target, 0o666)
    result = assess(target)
    files = {(f["tool"], f["rule_id"]): f["file"] for f in result["findings"]}
    assert files[("bandit", "B602")] == "target"
    assert files[("forgespace-file-scanner", "FS002")] == "target"
    assert all(name == "target" for name in files.values()), files
    uris = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for run in result["sarif"]["runs"]
        for r in run["results"]
    }
    assert uris == {"target"}
    check_sarif(result["sarif"])
