"""Crash-test hooks: pause a cache at a named phase so the test can SIGKILL it there.

``PauseAt(phases, signal_dir)`` is a ``forgespace.cache.hooks.CacheHooks``: at each phase
it is asked to stop at, it announces itself with the file ``{signal_dir}/{phase}.{pid}``
and sleeps (bounded: the test kills it long before).

``python -m support.faults PHASES SIGNAL_DIR CLI_ARGS...`` runs the forgespace CLI (e.g. a
worker) in a process whose every WorkspaceCache is built with these hooks.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from forgespace.cache.hooks import Phase

PAUSE_SECONDS = 120.0


class PauseAt:
    """Announce and sleep at each of ``phases`` (comma-separated names or a list)."""

    def __init__(self, phases: str | list[str], signal_dir: str | Path) -> None:
        names = phases.split(",") if isinstance(phases, str) else phases
        self.phases = frozenset(p for p in names if p)
        self.signal_dir = Path(signal_dir)

    def reached(self, phase: str) -> None:
        if phase not in self.phases:
            return
        self.signal_dir.mkdir(parents=True, exist_ok=True)
        (self.signal_dir / f"{phase}.{os.getpid()}").write_text(str(phase))
        time.sleep(PAUSE_SECONDS)


def install_default(hooks: PauseAt) -> None:
    """Make ``hooks`` the default of every WorkspaceCache this process builds."""
    from forgespace.cache import workspace

    original = workspace.WorkspaceCache.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("hooks", hooks)
        original(self, *args, **kwargs)

    workspace.WorkspaceCache.__init__ = init  # type: ignore[method-assign]


def cli_with_pause(phases: str, signal_dir: str | Path, *args: str) -> list[str]:
    """argv running the forgespace CLI with ``PauseAt(phases, signal_dir)`` installed."""
    return [sys.executable, "-m", "support.faults", phases, str(signal_dir), *args]


if __name__ == "__main__":
    install_default(PauseAt(sys.argv[1], sys.argv[2]))
    from forgespace.cli import main

    sys.argv = ["forgespace", *sys.argv[3:]]
    main()


FORK = multiprocessing.get_context("fork")
HOLD_SECONDS = 60.0


class HoldAt:
    """Hooks for a forked child: at ``phase`` (first time only) set ``arrived`` and wait for
    the test to set ``go``, so the test acts exactly while the child sits at that phase."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.arrived = FORK.Event()
        self.go = FORK.Event()
        self._held = False

    def reached(self, phase: Phase) -> None:
        if phase != self.phase or self._held:
            return
        self._held = True
        self.arrived.set()
        if not self.go.wait(HOLD_SECONDS):
            raise TimeoutError(f"the test never released the hold at {phase}")
