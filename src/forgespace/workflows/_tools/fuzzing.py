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
    cmd = _harness_command(target, corpus, crashes, max_crashes, max_iterations, timeout)

    out = HarnessOutput(Throttle(heartbeat), corpus)
    tool, killed = _run_harness(cmd, root, target, out, timeout=timeout, limits=limits)
    elapsed = time.monotonic() - out.started
    live = out.live()
    out.throttle(live, force=True)
    native = sorted(p for p in crashes.iterdir() if p.name.startswith("native-"))
    stopped = _stop_reason(
        out,
        tool,
        killed=killed,
        native_crash=bool(native),
        timed_out=elapsed >= timeout,
        max_iterations=max_iterations,
        target_name=target_name,
    )

    findings = [_python_finding(root, crashes, p) for p in sorted(crashes.glob("crash-*.json"))]
    findings += [_native_finding(root, p, list(out.tail)) for p in native]
    return {
        "target_file": target_name,
        "executions": live["executions"],
        "exec_per_sec": live["exec_per_sec"],
        "corpus_size": live["corpus_size"],
        "duration_seconds": round(elapsed, 3),
        "stopped": stopped,
        "crashes_total": max(out.crashes_total, len(findings)),
        "unique_crashes": len(findings),
        "corpus_dir": _rel(root, str(corpus)),
        "crash_dir": _rel(root, str(crashes)),
        "findings": findings,
    }


def _run_harness(
    cmd: list[str],
    root: Path,
    target: Path,
    out: HarnessOutput,
    *,
    timeout: int,
    limits: sandbox.Limits,
) -> tuple[sandbox.ToolProcess, bool]:
    """Run the harness to its end, feeding ``out``; returns it and whether it was killed at
    the deadline."""
    # Its own session and, sandboxed, its own PID namespace: a timeout kills all it started.
    tool = sandbox.current().popen(
        cmd, workspace=root, writable=True, cwd=target.parent, env=_harness_env(root), limits=limits
    )
    killed = pump_lines(
        tool.proc,
        out.feed,
        lambda: out.throttle.lazy(out.live),
        deadline=out.started + timeout + GRACE_SECONDS,
    )
    tool.check_started(out.tail)
    tool.close()
    return tool, killed


def _stop_reason(
    out: HarnessOutput,
    tool: sandbox.ToolProcess,
    *,
    killed: bool,
    native_crash: bool,
    timed_out: bool,
    max_iterations: int,
    target_name: str,
) -> str:
    """Why the fuzzing ended; a ToolError when the harness failed without a reason."""
    if killed:
        return "killed_at_deadline"
    if out.stop_event:
        return out.stop_event
    if native_crash:
        return "native_crash"
    if tool.proc.returncode != 0:
        raise ToolError(
            f"the atheris harness for {target_name!r} exited with code {tool.proc.returncode}"
            f"{sandbox_note(tool)}:\n" + "\n".join(out.tail)
        )
    if timed_out or out.stats["executions"] < max_iterations:
        return "timeout"
    return "max_iterations"


def _harness_command(
    target: Path, corpus: Path, crashes: Path, max_crashes: int, max_iterations: int, timeout: int
) -> list[str]:
    """The harness's command line: its own arguments, then libFuzzer's."""
    return [
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


def _harness_env(root: Path) -> dict[str, str]:
    env = sandbox.tool_env({"PYTHONUNBUFFERED": "1"})
    # The target's own modules resolve from its file's folder (the harness puts it first),
    # then from the target root and its src/ layout, so fuzz/fuzz_x.py can import mypkg.
    base = root.parent if root.is_file() else root
    paths = [str(base / "src")] if (base / "src").is_dir() else []
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(base), *inherited])
    return env


class HarnessOutput:
    """Reads the harness's output lines (``feed``): its ``MARK`` events (figures, crashes,
    why it stopped) and libFuzzer's status lines keep ``stats`` current; other lines are
    kept in ``tail`` for error messages."""

    def __init__(self, throttle: Throttle, corpus: Path) -> None:
        self.throttle = throttle
        self.corpus = corpus
        self.stats: dict[str, Any] = {
            "executions": 0,
            "exec_per_sec": 0.0,
            "corpus_size": 0,
            "crashes": 0,
        }
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.crashes_total = 0
        self.stop_event = ""
        self.started = time.monotonic()

    def live(self) -> dict[str, Any]:
        """The heartbeat's details now."""
        return _live(self.stats, self.started, self.corpus)

    def feed(self, line: str) -> None:
        if line.startswith(MARK):
            self._event(line)
            return
        self.tail.append(line)
        if m := _STATUS.match(line):
            self.stats["executions"] = max(self.stats["executions"], int(m.group(1)))
            self.stats["corpus_size"] = int(m.group(2))
        elif m := _DONE.match(line):
            self.stats["executions"] = max(self.stats["executions"], int(m.group(1)))

    def _event(self, line: str) -> None:
        try:
            event = json.loads(line[len(MARK) :])
        except json.JSONDecodeError:
            return
        kind = event.get("event")
        if kind == "stats":
            self.stats["executions"] = max(self.stats["executions"], int(event["executions"]))
            self.stats["crashes"] = int(event["unique_crashes"])
            self.crashes_total = int(event["crashes"])
        elif kind == "crash":
            self.stats["crashes"] += 1
            self.throttle(self.live(), force=True)
        elif kind == "stop":
            self.stop_event = str(event.get("reason", ""))


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
