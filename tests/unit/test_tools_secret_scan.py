"""secret_detection tool: planted secrets found with file/line/type, values never shown."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from forgespace.workflows._tools.common import tree_digest
from forgespace.workflows._tools.secret_scan import detect_secrets_scan

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vulnerable_app"
PLANTED_SECRETS = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "hunter2-not-a-real-password",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
    "demo-secret-key-not-real",
    "FAKE-KEY-FOR-THE-DEMO",
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    shutil.copytree(EXAMPLE, ws)
    return ws


def line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return n
    raise AssertionError(f"{needle} not in {path}")


def test_planted_secrets_are_found_with_file_line_and_type(app: Path) -> None:
    result = detect_secrets_scan(app)
    found = {(f["file"], f["line"], f["type"]) for f in result["findings"]}
    settings = app / "app" / "settings.py"
    assert ("app/settings.py", line_of(settings, "AKIA"), "AWS Access Key") in found
    assert ("app/settings.py", line_of(settings, "ghp_"), "GitHub Token") in found
    assert ("app/settings.py", line_of(settings, "DATABASE_PASSWORD"), "Secret Keyword") in found
    assert ("deploy/id_rsa", 1, "Private Key") in found
    assert (".env", 2, "Secret Keyword") in found
    assert not any(f["file"].startswith("app/handlers") for f in result["findings"])
    assert result["summary"]["total"] == len(result["findings"])
    assert result["summary"]["files_scanned"] == 6


def test_secret_values_appear_nowhere(app: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    beats: list[dict[str, Any]] = []
    result = detect_secrets_scan(app, heartbeat=beats.append)
    text = json.dumps(result) + json.dumps(beats) + caplog.text
    for secret in PLANTED_SECRETS:
        assert secret not in text
        assert secret[:8] not in text
    aws = next(f for f in result["findings"] if f["type"] == "AWS Access Key")
    assert aws["masked"] == "AK****"
    assert len(aws["fingerprint"]) == 12
    for f in result["findings"]:
        assert f["masked"].endswith("****") and len(f["masked"]) <= 6
    check = result["sarif"]
    assert check["version"] == "2.1.0"
    assert {r["ruleId"] for r in check["runs"][0]["results"]} >= {"secret/aws-access-key"}


def test_the_workspace_is_byte_for_byte_unchanged(app: Path) -> None:
    before = tree_digest(app)
    detect_secrets_scan(app)
    assert tree_digest(app) == before


def test_binary_and_oversized_files_are_skipped(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "blob.bin").write_bytes(b"\0AKIAIOSFODNN7EXAMPLE\0")
    (ws / "big.py").write_text('key = "AKIAIOSFODNN7EXAMPLE"\n' + "#" * 200)
    (ws / "small.py").write_text('key = "AKIAIOSFODNN7EXAMPLE"\n')
    result = detect_secrets_scan(ws, max_file_bytes=100)
    assert {f["file"] for f in result["findings"]} == {"small.py"}
    assert result["summary"]["files_skipped"] == 2


def test_a_single_file_target_is_named_by_its_file(tmp_path: Path) -> None:
    target = tmp_path / "t" / "target"
    target.parent.mkdir()
    target.write_text('aws_key = "AKIAIOSFODNN7EXAMPLE"\n')
    result = detect_secrets_scan(target)
    assert [(f["file"], f["line"], f["type"]) for f in result["findings"]] == [
        ("target", 1, "AWS Access Key")
    ]
    [sarif_result] = result["sarif"]["runs"][0]["results"]
    assert sarif_result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "target"
    assert "AKIAIOSFODNN7EXAMPLE" not in json.dumps(result)


@pytest.mark.parametrize("bad", [0, -5, True])
def test_a_bad_size_limit_is_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"max_file_bytes must be a positive integer, got {bad}"):
        detect_secrets_scan(tmp_path, max_file_bytes=bad)


def test_heartbeats_carry_the_scanners_latest_progress(tmp_path: Path) -> None:
    from forgespace.workflows._tools.secret_scan import PROGRESS, _last_progress

    log = tmp_path / "err.log"
    assert _last_progress(log) == {}  # not written yet
    log.write_text(
        f'{PROGRESS}{{"files_scanned": 3}}\nsome warning\n{PROGRESS}{{"files_scanned": 9}}\n'
        "another warning\n"
    )
    assert _last_progress(log) == {"files_scanned": 9}
    log.write_text(f'{PROGRESS}{{"files_scanned": 3}}\n{PROGRESS}{{"files_sc')  # cut short
    assert _last_progress(log) == {}
