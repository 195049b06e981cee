"""The same run id asked for twice at once: both calls stage the run, the first rename wins and
the second call returns the first one's workspace, discarding its own staging."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.procs import make_project, tree_digest

from forgespace.cache.hooks import Phase
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings


class _HoldAt:
    """Hooks that stop the calling thread at ``phase`` until released."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.arrived = threading.Event()
        self.release = threading.Event()

    def reached(self, phase: Phase) -> None:
        if phase == self.phase:
            self.arrived.set()
            assert self.release.wait(30), "never released"


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write"])
def test_the_same_run_published_twice_keeps_the_first(
    settings: Settings, tmp_path: Path, mode: str
) -> None:
    project = make_project(tmp_path / "p", files=5)
    first = WorkspaceCache(settings)
    tid = first.store.upload_target(project)
    hold = _HoldAt(Phase.STAGED_RUN)
    second = WorkspaceCache(settings, hooks=hold)
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(second.get_target(tid, "r1", mode)))
    t.start()
    try:
        # The second call has its run staged, not renamed into place; the first one now
        # publishes the same run id completely.
        assert hold.arrived.wait(30)
        winner = first.get_target(tid, "r1", mode)
        marker = Path(winner) / "written-by-the-run"
        marker.write_text("kept")
    finally:
        hold.release.set()
        t.join(30)
    assert got == [winner]  # the late call returns the published run, not its own copy
    assert marker.read_text() == "kept"
    digest = tree_digest(Path(winner))
    assert digest.pop("written-by-the-run") and digest == tree_digest(project)
    meta = settings.cache_dir / ".forgespace"
    assert list((meta / "tmp").iterdir()) == []  # its staging was discarded
    assert [e.key for e in first.index.entries() if e.kind == "run"] == [f"{tid}/r1"]
    first.cleanup_cache(winner, mode)
    assert not (settings.cache_dir / tid / "r1").exists()
    assert first.index.live_leases() == []
