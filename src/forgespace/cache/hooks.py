"""Where tests may step into the engine: named phases of a get_target, reported to a hooks
object the cache is built with (``WorkspaceCache(settings, hooks=...)``).

Production passes nothing and gets ``NO_HOOKS``, which does nothing. Crash tests run the cache
in a child process with hooks that pause at one phase so the test can SIGKILL it there; the
hooks live in the tests, never here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Phase(StrEnum):
    """The phases, in the order a get_target meets them (then gc's)."""

    DOWNLOAD = "download"  # the first bytes of the download arrived
    DOWNLOADED = "downloaded"  # the whole object is in staging
    EXTRACTED = "extracted"  # the workspace is extracted in staging
    SHARED_TARGET_PUBLISHED = "shared-target-published"  # shared: {tid}/target in place
    COW_COPIED = "cow-copied"  # copy-on-write: the run's copy is staged
    STAGED_RUN = "staged-run"  # a run directory is complete in staging, not yet renamed
    # shared / copy-on-write: no complete entry under the shared lock, which is released;
    # the exclusive lock is not tried yet (whoever takes it must check again)
    SHARED_MISS = "shared-miss"
    # an entry is in place and indexed; the caller's access and lease are not recorded yet
    PUBLISHED = "published"
    # gc / make_room: the eviction plan is made, nothing of it executed yet (each victim is
    # checked again under its target lock)
    GC_PLANNED = "gc-planned"
    # gc / make_room: one victim re-checked under its exclusive target lock (still held), not
    # yet deleted: a getter of that target must wait on the lock, never return this entry
    GC_VICTIM_CHECKED = "gc-victim-checked"


class CacheHooks(Protocol):
    """Called by the engine at each phase it reaches (in the calling thread)."""

    def reached(self, phase: Phase) -> None: ...


class NoHooks:
    """The production hooks: nothing happens at any phase."""

    def reached(self, phase: Phase) -> None:
        return None


NO_HOOKS = NoHooks()
