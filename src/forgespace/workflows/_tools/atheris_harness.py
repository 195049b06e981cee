"""Subprocess entry point that fuzzes one target file with atheris.

Run as ``python -m forgespace.workflows._tools.atheris_harness TARGET_FILE CRASH_DIR
MAX_CRASHES [libFuzzer args...]`` (MAX_CRASHES: stop after that many distinct crashes,
0 = never). The parent (``fuzzing.run_atheris``) reads this process's output.

Why a wrapper around ``TestOneInput``: libFuzzer stops at the first uncaught Python
exception, so one run would find at most one bug. The wrapper catches the exception,
records it once per distinct stack (crash input + JSON metadata in CRASH_DIR) and lets
fuzzing go on. Native crashes (segfaults in C extensions) and libFuzzer timeouts still
end the process; libFuzzer writes those inputs itself (``-artifact_prefix``).

Lines for the parent start with ``#FORGESPACE `` followed by JSON:
``{"event": "stats", "executions", "crashes", "unique_crashes"}`` about once a second and
``{"event": "crash", "signature", "file"}`` for each new distinct crash.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

MARK = "#FORGESPACE "
STATS_INTERVAL = 1.0
# Cap on distinct crash files: a target that raises on most inputs must not fill the disk.
MAX_UNIQUE_CRASHES = 100


def _emit(event: dict[str, object]) -> None:
    # stderr is where libFuzzer writes too; one write per line keeps lines whole.
    sys.stderr.write(MARK + json.dumps(event) + "\n")
    sys.stderr.flush()


def _target_frames(tb: TracebackType | None, skip_file: str) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(tb) if f.filename != skip_file]


def stack_signature(exc_type: str, frames: list[tuple[str, str, int | None]]) -> str:
    """Stable id of a crash: exception type plus (file name, function, line) of each frame.

    Only the base file name is used so the same bug in two workspaces (different
    absolute paths) gets the same signature.
    """
    h = hashlib.sha256(exc_type.encode())
    for filename, func, lineno in frames:
        h.update(f"|{os.path.basename(filename)}:{func}:{lineno}".encode())
    return h.hexdigest()[:16]


def load_target(target_file: Path) -> Callable[[bytes], object]:
    """Import ``target_file`` with atheris coverage instrumentation; return its TestOneInput."""
    import atheris

    target_dir = str(target_file.parent)
    sys.path.insert(0, target_dir)
    name = target_file.stem
    if name in sys.modules:
        raise SystemExit(
            f"target module name {name!r} clashes with an already imported module; rename the file"
        )
    # Instrument every module the target imports from its own tree (not the stdlib or
    # site-packages, which would only slow fuzzing down).
    with atheris.instrument_imports():
        module = importlib.import_module(name)
    fn = getattr(module, "TestOneInput", None)
    if not callable(fn):
        raise SystemExit(f"{target_file} defines no callable TestOneInput(data: bytes)")
    return fn


class Harness:
    """The ``TestOneInput`` libFuzzer calls: runs the target's, records each distinct Python
    exception once (crash input + JSON metadata in ``crash_dir``) and reports figures."""

    def __init__(
        self,
        test_one_input: Callable[[bytes], object],
        crash_dir: Path,
        *,
        max_crashes: int,
        last_run: int,
    ) -> None:
        self.test_one_input = test_one_input
        self.crash_dir = crash_dir
        self.max_crashes = max_crashes
        self.last_run = last_run
        self.here = os.path.abspath(__file__)
        self.seen: set[str] = set()
        self.executions = 0
        self.crashes = 0
        self.last = time.monotonic()

    def report_stats(self) -> None:
        _emit(
            {
                "event": "stats",
                "executions": self.executions,
                "crashes": self.crashes,
                "unique_crashes": len(self.seen),
            }
        )

    def __call__(self, data: bytes) -> None:
        self.executions += 1
        now = time.monotonic()
        if now - self.last >= STATS_INTERVAL:
            self.last = now
            self.report_stats()
        try:
            self.run_one(data)
        finally:
            # libFuzzer's own count may differ from ours by its start-up runs: report the
            # last few inputs' figures so the final ones are never lost.
            if self.executions >= self.last_run - 2 > 0:
                self.report_stats()

    def run_one(self, data: bytes) -> None:
        try:
            self.test_one_input(data)
        except Exception as exc:  # any Python exception the target lets escape is a finding
            self.crashes += 1
            self.record(exc, data)

    def record(self, exc: Exception, data: bytes) -> None:
        """Keep a new distinct crash (input and metadata); stop once there are enough."""
        frames = _target_frames(exc.__traceback__, self.here)
        sig = stack_signature(
            type(exc).__qualname__, [(f.filename, f.name, f.lineno) for f in frames]
        )
        if sig in self.seen or len(self.seen) >= MAX_UNIQUE_CRASHES:
            return
        self.seen.add(sig)
        crash_file = self.crash_dir / f"crash-{sig}"
        crash_file.write_bytes(data)
        meta = _crash_metadata(sig, exc, frames, self.executions)
        (self.crash_dir / f"crash-{sig}.json").write_text(json.dumps(meta, indent=2))
        _emit({"event": "crash", "signature": sig, "file": crash_file.name})
        self.report_stats()
        if self.max_crashes and len(self.seen) >= self.max_crashes:
            _emit({"event": "stop", "reason": "max_crashes"})
            sys.stdout.flush()
            os._exit(0)  # libFuzzer has no "stop now, all is well" call


def _crash_metadata(
    sig: str, exc: Exception, frames: list[traceback.FrameSummary], execution: int
) -> dict[str, object]:
    return {
        "signature": sig,
        "exception_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exception_message": str(exc)[:2000],
        "stack": [
            {"file": f.filename, "function": f.name, "line": f.lineno, "code": f.line}
            for f in frames
        ],
        "traceback": (
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_list(frames))
            + "".join(traceback.format_exception_only(type(exc), exc))
        )[-8000:],
        "execution": execution,
    }


def main(argv: list[str]) -> None:
    """Fuzz ``argv[1]``, distinct crashes to ``argv[2]``, stop after ``argv[3]`` of them.

    The remaining arguments go to libFuzzer.
    """
    import atheris

    target_file = Path(argv[1]).resolve()
    crash_dir = Path(argv[2]).resolve()
    crash_dir.mkdir(parents=True, exist_ok=True)
    max_crashes = int(argv[3])
    test_one_input = load_target(target_file)
    # libFuzzer ends the process with C exit() (no Python exit hooks run), so the figures of
    # the last input are sent when the -runs budget is reached; with -max_total_time the
    # last second of counts is approximate.
    last_run = next((int(a.split("=", 1)[1]) for a in argv[4:] if a.startswith("-runs=")), -1)
    harness = Harness(test_one_input, crash_dir, max_crashes=max_crashes, last_run=last_run)
    atheris.Setup([argv[0], *argv[4:]], harness)
    # libFuzzer ends the process itself (C exit) when its run or time budget is spent;
    # the parent takes the final figures from libFuzzer's "Done N runs" line.
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
