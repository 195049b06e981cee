"""The example's workflow logic: an inventory of the run's workspace.

It reads every file (count, bytes, one sha256 over paths and contents), then writes a marker
file named after its run: the workspace is the run's own (isolated), so no other run sees it.
A workspace path that does not exist on the host running the activity fails the run: that is
what happens when an activity lands on another host than its get_target.
"""

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from temporalio import activity


@activity.defn(name="inventory_workspace")
def inventory_workspace(target_path: str, run_id: str) -> dict[str, Any]:
    """Count and hash the workspace's files, then leave this run's marker in it."""
    root = Path(target_path)
    if not root.exists():
        raise FileNotFoundError(f"workspace {target_path} does not exist on {socket.gethostname()}")
    digest = hashlib.sha256()
    files = 0
    size = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        files += 1
        size += len(data)
    marker = root / f".inventory-{run_id}"
    marker.write_text(run_id + "\n")
    others = sorted(p.name for p in root.glob(".inventory-*") if p != marker)
    return {
        "workspace": target_path,
        "files": files,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "other_runs_markers": others,
        "cache_dir": os.environ.get("CACHE_DIR", ""),
        "host": socket.gethostname(),
        "findings": 0,
    }
