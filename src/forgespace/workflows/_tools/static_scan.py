"""Read-only static assessment of a workspace: bandit plus a file scanner, as SARIF 2.1.0.

Nothing is written into the workspace (it is shared by concurrent runs and read-only):
bandit runs in the process's sandbox (``forgespace.sandbox.current()``) with the workspace
bound read-only, its private ``/tmp`` as working directory and bytecode writing off; its
report comes back on stdout. The file scanner only reads.

The file scanner flags sensitive file names (private keys, ``.env``, keystores...),
world-writable files and directories, and large binary files; each flagged file carries
its sha256.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forgespace import sandbox
from forgespace.extras import require_extra
from forgespace.workflows._tools import sarif
from forgespace.workflows._tools.common import (
    SKIP_DIRS,
    Heartbeat,
    Throttle,
    ToolError,
    iter_files,
    kill_group,
    mask,
    relative_name,
    sandbox_note,
    sha256_file,
    workspace_root,
)

SCANNER_NAME = "forgespace-file-scanner"
SEVERITIES = ("high", "medium", "low")

# (glob on the file name, severity, what it is)
SENSITIVE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("id_rsa", "high", "SSH private key"),
    ("id_dsa", "high", "SSH private key"),
    ("id_ecdsa", "high", "SSH private key"),
    ("id_ed25519", "high", "SSH private key"),
    ("*.pem", "high", "PEM key or certificate"),
    ("*.key", "high", "private key"),
    ("*.p12", "high", "PKCS#12 keystore"),
    ("*.pfx", "high", "PKCS#12 keystore"),
    ("*.jks", "high", "Java keystore"),
    ("*.keystore", "high", "keystore"),
    ("*.kdbx", "high", "KeePass database"),
    (".env", "medium", "environment file with settings and often credentials"),
    (".env.*", "medium", "environment file with settings and often credentials"),
    (".netrc", "high", "netrc credentials"),
    (".pgpass", "high", "PostgreSQL password file"),
    (".htpasswd", "high", "HTTP password file"),
    (".pypirc", "medium", "PyPI credentials"),
    (".npmrc", "medium", "npm configuration (may hold tokens)"),
    ("credentials", "high", "cloud credentials file"),
    ("credentials.json", "high", "credentials file"),
    ("*.tfstate", "medium", "Terraform state (holds secrets in clear)"),
)
_FILE_RULES = {
    "FS001": ("sensitive-file", "A file whose name marks it as a secret or credential store"),
    "FS002": ("world-writable", "A file or directory any local user may modify"),
    "FS003": ("large-binary", "A large binary file checked into the target"),
}
# bandit's hard-coded-password checks quote the value in their message.
_QUOTES_SECRET = frozenset({"B105", "B106", "B107"})
_QUOTED = re.compile(r"'([^']*)'")
_BANDIT_SEVERITY = {"HIGH": "high", "MEDIUM": "medium", "LOW": "low", "UNDEFINED": "low"}


def _sensitive(name: str) -> tuple[str, str] | None:
    for pattern, severity, label in SENSITIVE_NAMES:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.lower(), pattern):
            return severity, label
    return None


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return False


def scan_files(
    root: Path, *, large_file_bytes: int, throttle: Throttle | None = None
) -> tuple[list[dict[str, Any]], int]:
    """File-scanner findings under ``root`` and the number of files looked at."""
    findings: list[dict[str, Any]] = []
    scanned = 0

    def flag(path: Path, rule_id: str, severity: str, message: str, *, is_dir: bool) -> None:
        findings.append(
            {
                "tool": SCANNER_NAME,
                "rule_id": rule_id,
                "rule_name": _FILE_RULES[rule_id][0],
                "severity": severity,
                "confidence": "high",
                "file": relative_name(root, path),
                "line": None,
                "message": message,
                "sha256": None if is_dir else sha256_file(path),
            }
        )

    if root.is_dir():
        for dirpath, dirnames, _ in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for d in dirnames:
                p = Path(dirpath, d)
                st = p.lstat()
                if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
                    msg = f"directory is world-writable (mode {stat.S_IMODE(st.st_mode):o})"
                    flag(p, "FS002", "medium", msg, is_dir=True)
    for path in iter_files(root):
        scanned += 1
        st = path.lstat()
        if hit := _sensitive(path.name):
            severity, label = hit
            flag(path, "FS001", severity, f"sensitive file: {label}", is_dir=False)
        if st.st_mode & stat.S_IWOTH:
            msg = f"file is world-writable (mode {stat.S_IMODE(st.st_mode):o})"
            flag(path, "FS002", "medium", msg, is_dir=False)
        if st.st_size >= large_file_bytes and _is_binary(path):
            msg = f"large binary file ({st.st_size} bytes)"
            flag(path, "FS003", "low", msg, is_dir=False)
        if throttle is not None:
            throttle({"phase": "file-scan", "files_scanned": scanned, "findings": len(findings)})
    return findings, scanned


def run_bandit(
    root: Path, *, timeout_seconds: float, throttle: Throttle | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the real bandit over ``root``; return (normalized findings, raw bandit metadata).

    Code snippets are left out of the findings on purpose: bandit's ``code`` field would
    copy hard-coded passwords it flags into the results.
    """
    require_extra("workflows", "the bandit scan", modules=("bandit",))
    cmd = [
        sys.executable,
        "-m",
        "bandit",
        *(["-r"] if root.is_dir() else []),
        str(root),
        "-f",
        "json",
        "-q",
        "--exit-zero",
    ]
    tool = sandbox.current().popen(
        cmd,
        workspace=root,
        writable=False,
        cwd="/tmp",
        env=sandbox.tool_env({"PYTHONDONTWRITEBYTECODE": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = _wait_for_bandit(tool, timeout_seconds=timeout_seconds, throttle=throttle)
    report = _bandit_report(tool, stdout, stderr)
    findings = [_bandit_finding(root, r) for r in report.get("results", [])]
    errors = [
        {"file": relative_name(root, Path(e["filename"])), "reason": e.get("reason", "")}
        for e in report.get("errors", [])
    ]
    return findings, {"errors": errors, "version": _bandit_version()}


def _wait_for_bandit(
    tool: sandbox.ToolProcess, *, timeout_seconds: float, throttle: Throttle | None
) -> tuple[bytes, bytes]:
    """bandit's stdout and stderr once it ended, heartbeating while it runs; killed (with
    all it started) when it runs out of time or the activity is cancelled."""
    started = time.monotonic()
    try:
        while True:
            try:
                stdout, stderr = tool.proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed > timeout_seconds:
                    raise ToolError(f"bandit did not finish within {timeout_seconds:g} s") from None
                if throttle is not None:
                    throttle({"phase": "bandit", "elapsed_seconds": round(elapsed, 1)})
    except BaseException:
        # Timed out, or the activity was cancelled through its heartbeat: no orphan scan.
        kill_group(tool)
        tool.close()
        raise
    tool.check_started(stderr.decode("utf-8", "replace").splitlines())
    tool.close()
    return stdout, stderr


def _bandit_report(tool: sandbox.ToolProcess, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    """bandit's JSON report; a ToolError with its output when it failed."""
    try:
        report = json.loads(stdout) if tool.proc.returncode == 0 else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        msg = (stderr or stdout).decode("utf-8", "replace")[-2000:]
        raise ToolError(
            f"bandit failed with exit code {tool.proc.returncode}{sandbox_note(tool)}: {msg}"
        )
    return report


def _bandit_finding(root: Path, r: dict[str, Any]) -> dict[str, Any]:
    """One bandit result in the findings' shape (secrets it quotes are masked)."""
    cwe = r.get("issue_cwe") or {}
    message = r.get("issue_text", "")
    if r["test_id"] in _QUOTES_SECRET:
        message = _QUOTED.sub(lambda m: repr(mask(m.group(1))), message)
    return {
        "tool": "bandit",
        "rule_id": r["test_id"],
        "rule_name": r.get("test_name", r["test_id"]),
        "severity": _BANDIT_SEVERITY.get(r.get("issue_severity", ""), "low"),
        "confidence": str(r.get("issue_confidence", "")).lower(),
        "file": relative_name(root, Path(r["filename"])),
        "line": r.get("line_number"),
        "column": (r.get("col_offset") or 0) + 1,
        "message": message,
        "cwe": cwe.get("id"),
        "help_uri": r.get("more_info"),
    }


def _bandit_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("bandit")
    except Exception:  # metadata missing is not worth failing a scan for
        return None


def to_sarif(findings: list[dict[str, Any]], bandit_version: str | None) -> dict[str, Any]:
    """SARIF 2.1.0 log with one run per tool (bandit, the file scanner)."""
    runs = []
    for tool, version, uri in (
        ("bandit", bandit_version, "https://bandit.readthedocs.io/"),
        (SCANNER_NAME, None, None),
    ):
        table = sarif.RuleTable()
        results = []
        for f in (f for f in findings if f["tool"] == tool):
            idx = table.index(
                f["rule_id"],
                lambda f=f: sarif.rule(
                    f["rule_id"],
                    f["rule_name"],
                    _FILE_RULES[f["rule_id"]][1] if f["rule_id"] in _FILE_RULES else f["message"],
                    help_uri=f.get("help_uri"),
                    severity=f["severity"],
                ),
            )
            props: dict[str, Any] = {"severity": f["severity"], "confidence": f["confidence"]}
            if f.get("cwe"):
                props["cwe"] = f"CWE-{f['cwe']}"
            if f.get("sha256"):
                props["sha256"] = f["sha256"]
            results.append(
                sarif.result(
                    f["rule_id"],
                    idx,
                    f["severity"],
                    f["message"],
                    f["file"],
                    line=f.get("line"),
                    column=f.get("column"),
                    properties=props,
                )
            )
        runs.append(
            sarif.run(
                tool, version=version, information_uri=uri, rules=table.rules, results=results
            )
        )
    return sarif.log(runs)


def assess(
    workspace: str | os.PathLike[str],
    *,
    large_file_bytes: int = 10 * 1024 * 1024,
    timeout_seconds: float = 600,
    heartbeat: Heartbeat | None = None,
) -> dict[str, Any]:
    """Run bandit and the file scanner over ``workspace`` (read only); return JSON-able results.

    Result: ``{"findings": [...], "summary": {...}, "sarif": {...}, "bandit_errors": [...]}``.
    """
    root = workspace_root(workspace)
    if isinstance(large_file_bytes, bool) or int(large_file_bytes) <= 0:
        raise ValueError(f"large_file_bytes must be a positive integer, got {large_file_bytes!r}")
    throttle = Throttle(heartbeat)
    bandit_findings, meta = run_bandit(
        root, timeout_seconds=float(timeout_seconds), throttle=throttle
    )
    file_findings, scanned = scan_files(
        root, large_file_bytes=int(large_file_bytes), throttle=throttle
    )
    findings = bandit_findings + file_findings
    by_severity = {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITIES}
    summary = {
        "total": len(findings),
        "by_severity": by_severity,
        "by_tool": {
            "bandit": len(bandit_findings),
            SCANNER_NAME: len(file_findings),
        },
        "files_scanned": scanned,
    }
    throttle({"phase": "done", "findings": len(findings), **by_severity}, force=True)
    return {
        "findings": findings,
        "summary": summary,
        "sarif": to_sarif(findings, meta["version"]),
        "bandit_errors": meta["errors"],
    }
