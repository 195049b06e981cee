"""Run get_target in real OS processes (concurrency and crash tests), and tree helpers.

Children run ``python -m support.procs SPEC_JSON``: they build a WorkspaceCache from their
environment (``settings_env(settings)``) and the spec (crash hooks: support.faults), print
``READY``, wait for a go-file (a start barrier so all of them ask at the same instant), call
get_target_report and print one JSON line with the result, or the error type and message.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]


def _child_env(env: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    out = dict(env)
    out.update(extra or {})
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), out.get("PYTHONPATH", "")) if p)
    return out


def start_role(
    module: str, role: str, spec: dict[str, Any], env: dict[str, str]
) -> subprocess.Popen[str]:
    """``python -m support.{module} ROLE SPEC_JSON`` with ``env`` (tests/ on PYTHONPATH), its
    output piped: the child processes of the cross-process race and crash tests."""
    return subprocess.Popen(
        [sys.executable, "-m", f"support.{module}", role, json.dumps(spec)],
        env=_child_env(env, None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_getter(
    env: dict[str, str],
    target_id: str,
    run_id: str | None,
    mode: str,
    *,
    go_file: Path | None = None,
    extra_env: dict[str, str] | None = None,
    digest: bool = True,
    pause_at: str = "",
    signal_dir: Path | None = None,
) -> subprocess.Popen[str]:
    """Start one child that calls get_target(target_id, run_id, mode); with ``digest`` it
    also reports the sha256 of every file of the returned workspace. ``pause_at`` (phase
    names, comma-separated): the child's cache pauses there (support.faults.PauseAt),
    announcing it in ``signal_dir``."""
    spec = {
        "target_id": target_id,
        "run_id": run_id,
        "mode": mode,
        "go": str(go_file or ""),
        "digest": digest,
        "pause_at": pause_at,
        "signal_dir": str(signal_dir or ""),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "support.procs", json.dumps(spec)],
        env=_child_env(env, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_getters(
    env: dict[str, str],
    calls: Iterable[tuple[str, str | None, str]],
    go_dir: Path,
    *,
    timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
    digest: bool = True,
) -> list[dict[str, object]]:
    """Run every (target_id, run_id, mode) call in its own process, released at once.

    Returns each child's JSON result, in the order of ``calls``.
    """
    go = go_dir / f"go-{time.monotonic_ns()}"
    procs = [
        start_getter(env, t, r, m, go_file=go, extra_env=extra_env, digest=digest)
        for t, r, m in calls
    ]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # blocks until this child is ready
            if line.strip() != "READY":
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                raise AssertionError(f"child did not start: {line!r}\n{err}")
        go.write_text("go")
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            last = out.strip().splitlines()[-1] if out.strip() else ""
            if p.returncode != 0 or not last.startswith("{"):
                raise AssertionError(f"child failed (rc {p.returncode}): {out}\n{err}")
            res = json.loads(last)
            res["stderr"] = err
            results.append(res)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def make_project(root: Path, files: int = 50, size: int = 200, seed: str = "p") -> Path:
    """A deterministic project tree: ``files`` files in a few subdirectories, one script."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / f"pkg{i % 7}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        body = hashlib.sha256(f"{seed}{i}".encode()).hexdigest().encode()
        (d / f"f{i}.py").write_bytes((body * (size // len(body) + 1))[:size])
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho run\n")
    os.chmod(script, 0o755)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file (symlinks as 'link:target')."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.config import Settings
    from support.faults import PauseAt

    hooks = PauseAt(spec.get("pause_at", ""), spec.get("signal_dir") or ".")
    cache = WorkspaceCache(Settings.from_env(), hooks=hooks)
    print("READY", flush=True)
    go = spec.get("go")
    if go:
        deadline = time.monotonic() + 60
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                print(json.dumps({"error": "TimeoutError", "message": "no go signal"}))
                return 1
            time.sleep(0.002)
    t0 = time.perf_counter()
    try:
        res = cache.get_target_report(spec["target_id"], spec["run_id"], spec["mode"])
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        return 0
    seconds = time.perf_counter() - t0
    p = Path(res.path)
    digest: dict[str, str] = {}
    if spec.get("digest", True):
        digest = tree_digest(p) if p.is_dir() else {"": hashlib.sha256(p.read_bytes()).hexdigest()}
    print(
        json.dumps(
            {
                "path": res.path,
                "downloaded": res.downloaded,
                "mode": res.mode,
                "seconds": seconds,
                "digest": digest,
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
