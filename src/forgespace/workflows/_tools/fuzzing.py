"""atheris fuzzing of a Python ``TestOneInput``, run in a subprocess inside the workspace.

``run_atheris(workspace, ...)`` starts ``atheris_harness`` with the workspace's target file,
keeps the corpus in ``{workspace}/.atheris/corpus`` and crash inputs in
``{workspace}/.atheris/crashes``, reports live figures through the heartbeat callback and
returns the findings, one per distinct stack.

Python exceptions do not end the fuzzing: the harness records each distinct one and goes
on until ``max_iterations`` or ``timeout_seconds``. A native crash, a libFuzzer timeout or
an out-of-memory ends the run early; its input (written by libFuzzer) is reported too.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from forgespace import sandbox
from forgespace.extras import require_extra
from forgespace.workflows._tools.common import (
    SKIP_DIRS,
    Heartbeat,
    Throttle,
    ToolError,
    iter_files,
    pump_lines,
    resolve_inside,
    sandbox_note,
    workspace_root,
)

HARNESS_MODULE = "forgespace.workflows._tools.atheris_harness"
MARK = "#FORGESPACE "
WORK_DIR = ".atheris"
# libFuzzer status lines: "#95019\tNEW    cov: 14 ft: 14 corp: 7/39b ... exec/s: 0 rss: 44Mb"
_STATUS = re.compile(r"^#(\d+)\s+\w+\s.*?corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_TEST_ONE_INPUT = re.compile(rb"^\s*def\s+TestOneInput\s*\(", re.MULTILINE)
# How long past timeout_seconds the subprocess may take before it is killed: start-up and
# libFuzzer's own shutdown.
GRACE_SECONDS = 15.0
LOG_TAIL_LINES = 60


def discover_target(root: Path) -> Path:
    """The Python file under ``root`` that defines ``TestOneInput``.

    Files named ``fuzz*`` win over others; ties go to the shortest, then alphabetical path.
    """
    candidates: list[Path] = []
    for path in iter_files(root, skip_dirs=SKIP_DIRS | {"site-packages", "node_modules"}):
        if path.suffix != ".py":
            continue
        try:
            if path.stat().st_size > 2_000_000:
                continue
            if _TEST_ONE_INPUT.search(path.read_bytes()):
                candidates.append(path)
        except OSError:
            continue
    if not candidates:
        raise ValueError(
            f"no Python file defining TestOneInput(data) found under {root.name!r}; "
            "pass the parameter target_file (a path relative to the target)"
        )

    def rank(p: Path) -> tuple[int, int, str]:
        rel = p.relative_to(root).as_posix()
        return (0 if p.name.startswith("fuzz") else 1, rel.count("/"), rel)

    return min(candidates, key=rank)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _prepare(root: Path, target_file: str | None) -> tuple[Path, Path, str]:
    """Return (work_dir, target .py file, its name as reported)."""
    if root.is_file():
        # A single-file target is stored as ".../target" (no .py suffix): copy it next to
        # the workspace under a module name Python can import.
        work = root.parent / WORK_DIR
        src_dir = work / "src"
        src_dir.mkdir(parents=True, exist_ok=True)
        module = src_dir / "fuzz_target_module.py"
        shutil.copyfile(root, module)
        if not _TEST_ONE_INPUT.search(module.read_bytes()):
            raise ValueError(f"the target file {root.name!r} defines no TestOneInput(data)")
        return work, module, root.name
    if target_file:
        target = resolve_inside(root, target_file, what="target_file")
        if not target.is_file():
            raise ValueError(f"target_file {target_file!r} is not a file in the target")
    else:
        target = discover_target(root)
    return root / WORK_DIR, target, target.relative_to(root.resolve()).as_posix()


def _rel(root: Path, filename: str) -> str:
    base = (root.parent if root.is_file() else root).resolve()
    try:
        return Path(filename).resolve().relative_to(base).as_posix()
    except ValueError:
        return filename


def run_atheris(
    workspace: str | os.PathLike[str],
    *,
    target_file: str | None = None,
    max_iterations: int = 1_000_000,
    timeout_seconds: float = 60,
    max_crashes: int = 0,
    heartbeat: Heartbeat | None = None,
    limits: sandbox.Limits = sandbox.DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Fuzz the workspace's ``TestOneInput`` and return the results (JSON-able).

    Stops after ``max_iterations`` inputs or ``timeout_seconds``, whichever comes first,
    or once ``max_crashes`` distinct crashes are found (0 = keep fuzzing). The harness runs
    in the process's sandbox (``forgespace.sandbox.current()``) with ``limits``.
    """
    require_extra("workflows", "the atheris fuzzer", modules=("atheris",))
    root = workspace_root(workspace)
    max_iterations = _positive_int(max_iterations, "max_iterations")
    timeout = _positive_int(timeout_seconds, "timeout_seconds")
    if isinstance(max_crashes, bool) or not isinstance(max_crashes, int) or max_crashes < 0:
        raise ValueError(f"max_crashes must be an integer >= 0, got {max_crashes!r}")
    work, target, target_name = _prepare(root, target_file)
    corpus = work / "corpus"
    crashes = work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)

    cmd = [
        sys.executable,
        "-m",
        HARNESS_MODULE,
        str(target),
        str(crashes),
        str(max_crashes),
        f"-runs={max_iterations}",
        f"-max_total_time={timeout}",
        f"-timeout={min(timeout, 25)}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={crashes}{os.sep}native-",
        str(corpus),
    ]
    env = sandbox.tool_env({"PYTHONUNBUFFERED": "1"})
    # The target's own modules resolve from its file's folder (the harness puts it first),
    # then from the target root and its src/ layout, so fuzz/fuzz_x.py can import mypkg.
    base = root.parent if root.is_file() else root
    paths = [str(base / "src")] if (base / "src").is_dir() else []
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(base), *inherited])
    stats: dict[str, Any] = {"executions": 0, "exec_per_sec": 0.0, "corpus_size": 0, "crashes": 0}
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    throttle = Throttle(heartbeat)
    started = time.monotonic()
    stopped = "max_iterations"
    crashes_total = 0
    stop_event = ""

    # Its own session and, sandboxed, its own PID namespace: a timeout kills all it started.
    tool = sandbox.current().popen(
        cmd, workspace=root, writable=True, cwd=target.parent, env=env, limits=limits
    )
    proc = tool.proc
    deadline = started + timeout + GRACE_SECONDS

    def on_line(line: str) -> None:
        nonlocal crashes_total, stop_event
        if line.startswith(MARK):
            try:
                event = json.loads(line[len(MARK) :])
            except json.JSONDecodeError:
                return
            kind = event.get("event")
            if kind == "stats":
                stats["executions"] = max(stats["executions"], int(event["executions"]))
                stats["crashes"] = int(event["unique_crashes"])
                crashes_total = int(event["crashes"])
            elif kind == "crash":
                stats["crashes"] += 1
                throttle(_live(stats, started, corpus), force=True)
            elif kind == "stop":
                stop_event = str(event.get("reason", ""))
            return
        tail.append(line)
        if m := _STATUS.match(line):
            stats["executions"] = max(stats["executions"], int(m.group(1)))
            stats["corpus_size"] = int(m.group(2))
        elif m := _DONE.match(line):
            stats["executions"] = max(stats["executions"], int(m.group(1)))

    killed = pump_lines(
        proc,
        on_line,
        lambda: throttle.lazy(lambda: _live(stats, started, corpus)),
        deadline=deadline,
    )
    returncode = proc.returncode
    tool.check_started(tail)
    tool.close()
    elapsed = time.monotonic() - started
    live = _live(stats, started, corpus)
    throttle(live, force=True)

    native = sorted(p for p in crashes.iterdir() if p.name.startswith("native-"))
    if killed:
        stopped = "killed_at_deadline"
    elif stop_event:
        stopped = stop_event
    elif native:
        stopped = "native_crash"
    elif returncode != 0:
        raise ToolError(
            f"the atheris harness for {target_name!r} exited with code {returncode}"
            f"{sandbox_note(tool)}:\n" + "\n".join(tail)
        )
    elif elapsed >= timeout or stats["executions"] < max_iterations:
        stopped = "timeout"

    findings = [_python_finding(root, crashes, p) for p in sorted(crashes.glob("crash-*.json"))]
    findings += [_native_finding(root, p, list(tail)) for p in native]
    return {
        "target_file": target_name,
        "executions": live["executions"],
        "exec_per_sec": live["exec_per_sec"],
        "corpus_size": live["corpus_size"],
        "duration_seconds": round(elapsed, 3),
        "stopped": stopped,
        "crashes_total": max(crashes_total, len(findings)),
        "unique_crashes": len(findings),
        "corpus_dir": _rel(root, str(corpus)),
        "crash_dir": _rel(root, str(crashes)),
        "findings": findings,
    }


def _live(stats: dict[str, Any], started: float, corpus: Path) -> dict[str, Any]:
    elapsed = max(time.monotonic() - started, 1e-6)
    try:
        corpus_files = sum(1 for _ in corpus.iterdir())
    except OSError:
        corpus_files = 0
    return {
        "executions": int(stats["executions"]),
        "exec_per_sec": round(stats["executions"] / elapsed, 1),
        "corpus_size": max(int(stats["corpus_size"]), corpus_files),
        "crashes": int(stats["crashes"]),
    }


def _python_finding(root: Path, crashes: Path, meta_file: Path) -> dict[str, Any]:
    meta = json.loads(meta_file.read_text())
    data = (crashes / meta_file.stem).read_bytes()
    stack = [{**f, "file": _rel(root, f["file"])} for f in meta["stack"]]
    top = stack[-1] if stack else {}
    return {
        "kind": "python_exception",
        "signature": meta["signature"],
        "exception_type": meta["exception_type"],
        "exception_message": meta["exception_message"],
        "location": f"{top.get('file', '?')}:{top.get('line', '?')}",
        "stack": stack,
        "traceback": meta["traceback"],
        "input_base64": base64.b64encode(data).decode(),
        "input_size": len(data),
        "crash_file": _rel(root, str(crashes / meta_file.stem)),
    }


def _native_finding(root: Path, path: Path, log_tail: list[str]) -> dict[str, Any]:
    data = path.read_bytes()
    kind = path.name.removeprefix("native-").split("-", 1)[0]  # crash | timeout | oom | leak
    return {
        "kind": f"native_{kind}",
        "signature": path.name.rsplit("-", 1)[-1][:16],
        "exception_type": kind,
        "exception_message": next(
            (ln for ln in log_tail if "ERROR: libFuzzer" in ln or "Uncaught" in ln), kind
        ),
        "location": "",
        "stack": [],
        "traceback": "\n".join(log_tail[-30:]),
        "input_base64": base64.b64encode(data).decode(),
        "input_size": len(data),
        "crash_file": _rel(root, str(path)),
    }
