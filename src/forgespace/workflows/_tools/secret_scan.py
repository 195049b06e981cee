"""Secret detection with detect-secrets; secret values never leave the scanning process.

``detect_secrets_scan(workspace)`` runs this module as a subprocess
(``python -m forgespace.workflows._tools.secret_scan ROOT``). The child scans with
detect-secrets' default plugins and filters, masks every value itself and prints only
masked findings as JSON, so raw values never reach the worker's memory, logs or results.
A subprocess also keeps detect-secrets' process-global settings away from concurrent
activities in the worker.

Each finding: file, line, secret type, ``masked`` (first two characters + ``****``) and
``fingerprint`` (first 12 hex digits of the value's sha256) to tell repeated secrets apart.
Nothing is written into the workspace.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from forgespace import sandbox
from forgespace.extras import require_extra
from forgespace.workflows._tools import sarif
from forgespace.workflows._tools.common import (
    Heartbeat,
    Throttle,
    ToolError,
    fingerprint,
    iter_files,
    kill_group,
    mask,
    relative_name,
    sandbox_note,
    workspace_root,
)

PROGRESS = "#PROGRESS "
DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _scan_in_child(root: Path, max_file_bytes: int) -> None:
    """Child side: scan, mask, print JSON. Runs in its own process (see module docstring)."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    base = root.parent if root.is_file() else root
    collection = SecretsCollection(root=str(base))
    scanned = skipped = 0
    last = time.monotonic()
    with default_settings():
        for path in iter_files(root):
            try:
                if path.stat().st_size > max_file_bytes or _looks_binary(path):
                    skipped += 1
                    continue
            except OSError:
                skipped += 1
                continue
            collection.scan_file(path.relative_to(base).as_posix())
            scanned += 1
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                sys.stderr.write(PROGRESS + json.dumps({"files_scanned": scanned}) + "\n")
                sys.stderr.flush()
    findings = []
    for filename, secret in collection:
        value = secret.secret_value or ""
        findings.append(
            {
                "file": Path(filename).as_posix(),
                "line": secret.line_number,
                "type": secret.type,
                "masked": mask(value),
                "fingerprint": fingerprint(value),
            }
        )
    findings.sort(key=lambda f: (f["file"], f["line"], f["type"]))
    json.dump(
        {"findings": findings, "files_scanned": scanned, "files_skipped": skipped}, sys.stdout
    )


def detect_secrets_scan(
    workspace: str | os.PathLike[str],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout_seconds: float = 600,
    heartbeat: Heartbeat | None = None,
) -> dict[str, Any]:
    """Scan ``workspace`` for secrets (read only); return masked, JSON-able results.

    Result: ``{"findings": [...], "summary": {"total", "by_type", "files_scanned",
    "files_skipped"}, "sarif": {...}}``.
    """
    require_extra("workflows", "the detect-secrets scan", modules=("detect_secrets",))
    root = workspace_root(workspace)
    if isinstance(max_file_bytes, bool) or int(max_file_bytes) <= 0:
        raise ValueError(f"max_file_bytes must be a positive integer, got {max_file_bytes!r}")
    throttle = Throttle(heartbeat)
    report = _run_scanner(root, int(max_file_bytes), timeout_seconds, throttle)
    findings = report["findings"]
    if root.is_file():
        for f in findings:
            f["file"] = relative_name(root, root)
    by_type: dict[str, int] = {}
    for f in findings:
        by_type[f["type"]] = by_type.get(f["type"], 0) + 1
    summary = {
        "total": len(findings),
        "by_type": by_type,
        "files_scanned": report["files_scanned"],
        "files_skipped": report["files_skipped"],
    }
    throttle({"phase": "done", "findings": len(findings)}, force=True)
    return {"findings": findings, "summary": summary, "sarif": to_sarif(findings)}


def _run_scanner(
    root: Path, max_file_bytes: int, timeout_seconds: float, throttle: Throttle
) -> dict[str, Any]:
    """Run this module's scanner (``main``) in the sandbox; return its JSON report."""
    with tempfile.TemporaryDirectory(prefix="forgespace-secrets-") as tmp:
        out_path = Path(tmp) / "out.json"
        err_path = Path(tmp) / "err.log"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Output goes to files of ours through inherited descriptors: the sandbox itself
            # sees only the workspace (read-only) and its private /tmp.
            tool = sandbox.current().popen(
                [sys.executable, "-m", __name__, str(root), str(max_file_bytes)],
                workspace=root,
                writable=False,
                cwd="/tmp",
                env=sandbox.tool_env({"PYTHONDONTWRITEBYTECODE": "1"}),
                stdout=out,
                stderr=err,
            )
            _wait_for_scanner(tool, err_path, timeout_seconds, throttle)
        tool.check_started(err_path.read_text(errors="replace").splitlines()[-5:])
        tool.close()
        if tool.proc.returncode != 0:
            # Only the last line (the exception) is shown: the rest could quote file content.
            lines = err_path.read_text(errors="replace").strip().splitlines()
            last = lines[-1][:300] if lines else ""
            raise ToolError(
                f"detect-secrets failed with exit code {tool.proc.returncode}"
                f"{sandbox_note(tool)}: {last}"
            )
        report: dict[str, Any] = json.loads(out_path.read_text())
        return report


def _wait_for_scanner(
    tool: sandbox.ToolProcess, err_path: Path, timeout_seconds: float, throttle: Throttle
) -> None:
    """Wait for the scanner to end, heartbeating its progress; killed (with all it started)
    when it runs out of time or the activity is cancelled."""
    started = time.monotonic()
    try:
        while tool.proc.poll() is None:
            if time.monotonic() - started > timeout_seconds:
                raise ToolError(f"detect-secrets did not finish within {timeout_seconds:g} s")
            throttle.lazy(lambda: {"phase": "detect-secrets", **_last_progress(err_path)})
            time.sleep(0.2)
    except BaseException:
        # Timed out, or the activity was cancelled through its heartbeat.
        kill_group(tool)
        tool.close()
        raise


def _last_progress(err_path: Path) -> dict[str, Any]:
    try:
        lines = err_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        if line.startswith(PROGRESS):
            try:
                return dict(json.loads(line[len(PROGRESS) :]))
            except json.JSONDecodeError:
                return {}
    return {}


def _rule_id(secret_type: str) -> str:
    return "secret/" + "-".join(secret_type.lower().split())


def to_sarif(findings: list[dict[str, Any]]) -> dict[str, Any]:
    """SARIF 2.1.0 log of the (masked) findings, one rule per secret type."""
    table = sarif.RuleTable()
    results = []
    for f in findings:
        rid = _rule_id(f["type"])
        idx = table.index(
            rid,
            lambda f=f, rid=rid: sarif.rule(
                rid, f["type"], f"Possible {f['type']}", severity="high"
            ),
        )
        results.append(
            sarif.result(
                rid,
                idx,
                "high",
                f"{f['type']} ({f['masked']})",
                f["file"],
                line=f["line"],
                properties={"fingerprint": f["fingerprint"]},
            )
        )
    return sarif.log(
        [
            sarif.run(
                "detect-secrets",
                version=_version(),
                information_uri="https://github.com/Yelp/detect-secrets",
                rules=table.rules,
                results=results,
            )
        ]
    )


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("detect-secrets")
    except Exception:  # metadata missing is not worth failing a scan for
        return None


if __name__ == "__main__":
    _scan_in_child(Path(sys.argv[1]), int(sys.argv[2]))
