"""pump_lines: a tool's output read by a thread of its own, fed to callbacks; when a callback
raises, the tool is killed and the reader thread ends cleanly (no thread left blocked, no
"readline of closed file")."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forgespace.workflows._tools.common import pump_lines

# Prints 30,000 short lines (60 kB: more than the reader's 10,000-line queue holds, less than
# a pipe buffer, so the writer never blocks), then says so and waits to be killed.
_CHATTY = """
import sys, time
sys.stdout.write("x\\n" * 30000)
sys.stdout.flush()
open(sys.argv[1], "w").close()
time.sleep(120)
"""


def _start(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, start_new_session=True
    )


def test_a_raising_callback_kills_the_tool_and_ends_the_reader(tmp_path: Path) -> None:
    written = tmp_path / "written"
    thread_errors: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: thread_errors.append(args.exc_value)
    proc = _start(_CHATTY, str(written))
    before = set(threading.enumerate())

    def on_line(line: str) -> None:
        # Stop listening only once the whole output is in the pipe and the reader's queue
        # is full: the reader is then blocked handing over a line nobody will take.
        deadline = time.monotonic() + 30
        while not written.exists():
            assert time.monotonic() < deadline, "the tool never wrote its output"
            time.sleep(0.01)
        raise RuntimeError("cancelled")

    try:
        with pytest.raises(RuntimeError, match="cancelled"):
            pump_lines(proc, on_line, lambda: None, deadline=time.monotonic() + 60)
        readers = [t for t in set(threading.enumerate()) - before if t.name == "tool-output"]
        for t in readers:
            t.join(10)
        assert [t for t in readers if t.is_alive()] == [], "the reader thread is still blocked"
    finally:
        threading.excepthook = old_hook
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None and proc.returncode < 0  # killed, not finished
    assert thread_errors == []
    assert proc.stdout is not None and proc.stdout.closed


def test_every_line_reaches_the_callback_and_stdout_is_closed() -> None:
    proc = _start("for i in range(20000): print(i)")
    got: list[str] = []
    timed_out = pump_lines(proc, got.append, lambda: None, deadline=time.monotonic() + 60)
    assert not timed_out
    assert got == [str(i) for i in range(20000)]
    assert proc.returncode == 0
    assert proc.stdout is not None and proc.stdout.closed
