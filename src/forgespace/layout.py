"""Isolation modes, id validation and the pure path arithmetic of the cache layout.

Layout (exactly the seed's)::

    {CACHE_DIR}/{target_id}/{run_id}/target      isolated: the run's download
    {CACHE_DIR}/{target_id}/{run_id}/workspace   isolated and copy-on-write: the run's workspace
    {CACHE_DIR}/{target_id}/target               shared: the one download
    {CACHE_DIR}/{target_id}/workspace            shared: the one workspace
    {CACHE_DIR}/{target_id}/shared/target        copy-on-write: the one download
    {CACHE_DIR}/{target_id}/shared/workspace     copy-on-write: the pristine extracted copy
    {CACHE_DIR}/.forgespace/                     bookkeeping (never a valid target id)

Nothing here touches the filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeGuard

from forgespace.errors import InvalidIdError, InvalidModeError

# \Z, not $: "$" also matches before a final newline, so "abc\n" would pass a plain match.
# Callers use is_valid_id / validate_id (fullmatch), never ID_PATTERN.match on their own.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
RESERVED_IDS = frozenset({"shared", "workspace", "target"})
ID_FORMS = (
    "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, "
    "and not 'shared', 'workspace' or 'target'"
)
META_DIRNAME = ".forgespace"


class IsolationMode(StrEnum):
    """How a run's workspace relates to other runs of the same target."""

    ISOLATED = "isolated"
    SHARED = "shared"
    COPY_ON_WRITE = "copy-on-write"

    @classmethod
    def parse(cls, value: str | IsolationMode) -> IsolationMode:
        """Accept exactly ``isolated``, ``shared`` or ``copy-on-write``."""
        if isinstance(value, IsolationMode):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InvalidModeError(
                f"invalid workspace_isolation {value!r}: expected one of {allowed}"
            ) from None


def is_valid_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is, as a whole string, a valid target/run id (not a reserved name)."""
    if not isinstance(value, str):
        return False
    return ID_PATTERN.fullmatch(value) is not None and value not in RESERVED_IDS


def validate_id(value: object, what: str = "target_id") -> str:
    """Return ``value`` if it is a valid target/run id, else raise InvalidIdError (also a
    ValueError) naming the value with repr(), so a newline or NUL in it shows."""
    if not is_valid_id(value):
        why = ""
        if isinstance(value, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            why = " (it contains a control character)"
        raise InvalidIdError(f"invalid {what} {value!r}{why}: expected {ID_FORMS}")
    return value


#: A tampered shared workspace still in use, moved aside by its repair: ``{tid}/.retired-*``.
RETIRED_PREFIX = ".retired-"
#: Name of the file in a run directory saying which mode made it (CacheLayout.run_mode_file).
RUN_MODE_FILE = ".forgespace-mode"
#: Name of the file in an overlay-backed run directory naming the staging attempt whose
#: upper/work directories it uses: ``.forgespace/overlay/{tid}/{rid}/{attempt}``.
OVERLAY_ATTEMPT_FILE = ".forgespace-overlay"


@dataclass(frozen=True)
class CacheLayout:
    """Paths of every cache entry under one CACHE_DIR."""

    root: Path

    # --- target-level -------------------------------------------------------------
    def target_dir(self, target_id: str) -> Path:
        return self.root / target_id

    def shared_target(self, target_id: str) -> Path:
        """shared mode: the one download."""
        return self.root / target_id / "target"

    def shared_workspace(self, target_id: str) -> Path:
        """shared mode: the one workspace."""
        return self.root / target_id / "workspace"

    def cow_shared_dir(self, target_id: str) -> Path:
        """copy-on-write: the directory holding the one download and its pristine workspace."""
        return self.root / target_id / "shared"

    def cow_shared_target(self, target_id: str) -> Path:
        return self.cow_shared_dir(target_id) / "target"

    def cow_shared_workspace(self, target_id: str) -> Path:
        return self.cow_shared_dir(target_id) / "workspace"

    # --- run-level ----------------------------------------------------------------
    def run_dir(self, target_id: str, run_id: str) -> Path:
        return self.root / target_id / run_id

    def run_target(self, target_id: str, run_id: str) -> Path:
        return self.run_dir(target_id, run_id) / "target"

    def run_workspace(self, target_id: str, run_id: str) -> Path:
        return self.run_dir(target_id, run_id) / "workspace"

    def run_mode_file(self, target_id: str, run_id: str) -> Path:
        """Written at publish: the isolation mode that made the run directory (an index
        rebuild and cleanup's mode check read it, rather than guess from the shape)."""
        return self.run_dir(target_id, run_id) / RUN_MODE_FILE

    # --- bookkeeping --------------------------------------------------------------
    @property
    def meta_dir(self) -> Path:
        return self.root / META_DIRNAME

    @property
    def locks_dir(self) -> Path:
        """Lock files live here and are never deleted (a leftover lock file means nothing)."""
        return self.meta_dir / "locks"

    @property
    def tmp_dir(self) -> Path:
        """Staging area on the cache's filesystem, so publishing is a rename."""
        return self.meta_dir / "tmp"

    @property
    def trash_dir(self) -> Path:
        """Directories renamed here are already invisible; deleting them is then safe."""
        return self.meta_dir / "trash"

    @property
    def index_path(self) -> Path:
        return self.meta_dir / "index.sqlite"

    @property
    def overlay_dir(self) -> Path:
        """Upper/work directories of overlay-backed copy-on-write runs: one directory per
        staging attempt, ``{tid}/{rid}/{staging name}/{upper,work}`` (staging.py owns them)."""
        return self.meta_dir / "overlay"

    def lock_path(self, target_id: str) -> Path:
        return self.locks_dir / f"{target_id}.lock"

    def workspace_paths(
        self, mode: IsolationMode, target_id: str, run_id: str | None
    ) -> tuple[Path, Path]:
        """(download path, workspace path) the run of ``mode`` uses."""
        if mode is IsolationMode.SHARED:
            return self.shared_target(target_id), self.shared_workspace(target_id)
        if run_id is None:
            raise InvalidIdError(f"run_id is required for workspace_isolation {mode.value!r}")
        return self.run_target(target_id, run_id), self.run_workspace(target_id, run_id)
