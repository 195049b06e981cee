"""The scanner's activity: list the shared workspace's files and flag sensitive ones.

It only reads: the shared workspace is read-only and every run of the target sees it.
"""

import fnmatch
import hashlib
import socket
from pathlib import Path
from typing import Any

from temporalio import activity

SENSITIVE = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", ".env", "credentials", "*.pem", "*.key")


@activity.defn(name="scan_files")
def scan_files_activity(target_path: str, config: dict[str, Any]) -> dict[str, Any]:
    """Files matching ``config["patterns"]``; sensitive names become findings with a sha256."""
    root = Path(target_path)
    if not root.exists():
        raise FileNotFoundError(f"workspace {target_path} does not exist on {socket.gethostname()}")
    patterns = config.get("patterns") or ["*"]
    max_size = int(config.get("max_file_size", 10485760))
    findings = []
    scanned = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not any(
            fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in patterns
        ):
            continue
        scanned += 1
        if config.get("check_sensitive", True) and any(
            fnmatch.fnmatch(path.name, pat) for pat in SENSITIVE
        ):
            size = path.stat().st_size
            sha = hashlib.sha256(path.read_bytes()).hexdigest() if size <= max_size else None
            findings.append({"file": rel, "type": "sensitive_file", "size": size, "sha256": sha})
    return {
        "findings": findings,
        "summary": {
            "total_files": scanned,
            "total_findings": len(findings),
            "host": socket.gethostname(),
        },
        "workspace": target_path,
    }
