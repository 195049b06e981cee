"""Which paths cleanup_cache may delete: a run directory of the given mode (or its workspace or
target) inside CACHE_DIR, never through a symlink; anything else is refused, naming what is
accepted, and nothing is deleted."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from forgespace.errors import CleanupRefusedError, InvalidIdError
from forgespace.layout import CacheLayout, IsolationMode, validate_id


def parse_cleanup_path(
    layout: CacheLayout,
    path: str | os.PathLike[str],
    mode: IsolationMode,
    run_dir_mode: Callable[[str, str], str | None],
) -> tuple[str, str]:
    """(target_id, run_id or 'workspace'/'target') of an acceptable path, else refuse."""
    raw = os.fspath(path)
    refuse = _refuser(layout, raw, mode)
    parts = _parts_inside(layout, raw, refuse)
    try:
        tid = validate_id(parts[0], "target_id")
    except InvalidIdError:
        raise refuse(f"{parts[0]!r} is not a target directory") from None
    if len(parts) == 1:
        raise refuse("that is a whole target directory, not a run directory")
    if mode is IsolationMode.SHARED:
        if len(parts) == 2 and parts[1] in ("workspace", "target"):
            return tid, parts[1]
        raise refuse("not the shared workspace or target of a target")
    rid = _run_id(parts, refuse)
    if os.path.lexists(layout.run_dir(tid, rid)):
        made_by = run_dir_mode(tid, rid)
        if made_by is not None and made_by != mode.value:
            raise refuse(f"that is a run directory of workspace_isolation {made_by!r}")
    return tid, rid


_Refuse = Callable[[str], CleanupRefusedError]


def _refuser(layout: CacheLayout, raw: str, mode: IsolationMode) -> _Refuse:
    """The error for refusing ``raw``: says why, what is accepted, and that nothing was deleted."""
    accepted = (
        "{CACHE_DIR}/{target_id}/workspace or {CACHE_DIR}/{target_id}/target"
        if mode is IsolationMode.SHARED
        else "{CACHE_DIR}/{target_id}/{run_id}[/workspace|/target]"
    )

    def refuse(why: str) -> CleanupRefusedError:
        return CleanupRefusedError(
            f"refusing to clean up {raw!r} (workspace_isolation {mode.value!r}): {why}; "
            f"accepted: {accepted} inside {layout.root}; nothing was deleted"
        )

    return refuse


def _parts_inside(layout: CacheLayout, raw: str, refuse: _Refuse) -> list[str]:
    """The components of ``raw`` below CACHE_DIR; refuse a path outside it or through a link."""
    if not raw:
        raise refuse("empty path")
    p = os.path.abspath(raw)
    root_real = os.path.realpath(layout.root)
    rel = None
    for base in (os.path.abspath(layout.root), root_real):
        if p == base:
            raise refuse("that is CACHE_DIR itself")
        if p.startswith(base + os.sep):
            rel = p[len(base) + 1 :]
            break
    if rel is None:
        raise refuse("it is outside CACHE_DIR")
    parts = rel.split(os.sep)
    # No component may be a symlink: a link could point anywhere, even at another run.
    cur = root_real
    for part in parts:
        cur = os.path.join(cur, part)
        try:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                raise refuse(f"{cur} is a symbolic link")
        except FileNotFoundError:
            break
    return parts


def _run_id(parts: list[str], refuse: _Refuse) -> str:
    """The run id of ``{target_id}/{run_id}[/workspace|/target]``; refuse anything else."""
    if parts[1] == "shared":
        raise refuse("that is the copy-on-write shared copy")
    if parts[1] in ("workspace", "target"):
        raise refuse("that is the shared-mode workspace of the target")
    try:
        rid = validate_id(parts[1], "run_id")
    except InvalidIdError:
        raise refuse(f"{parts[1]!r} is not a run directory") from None
    if not (len(parts) == 2 or (len(parts) == 3 and parts[2] in ("workspace", "target"))):
        raise refuse("a path inside a run's workspace; pass the run directory or its workspace")
    return rid
