"""`forgespace cleanup PATH` without --isolation: which mode a path belongs to, read from
where it is under CACHE_DIR and what the index recorded for its run (None: cannot tell, and
the engine then checks the path against the mode it is given)."""

from __future__ import annotations

from pathlib import Path

from support.procs import make_project

from forgespace.cache.workspace import WorkspaceCache
from forgespace.cli.workspace_cmds import infer_mode
from forgespace.config import Settings


def test_the_mode_of_a_path_comes_from_the_layout_and_the_index(
    settings: Settings, tmp_path: Path
) -> None:
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=3))
    iso = Path(cache.get_target(tid, "r-iso", "isolated"))
    cow = Path(cache.get_target(tid, "r-cow", "copy-on-write"))
    shared = Path(cache.get_target(tid, None, "shared"))
    root = cache.layout.root

    def mode(path: Path | str) -> str | None:
        return infer_mode(root, str(path), cache.index)

    assert mode(iso) == "isolated" and mode(iso.parent) == "isolated"
    assert mode(cow) == "copy-on-write"
    assert mode(shared) == "shared" and mode(root / tid / "target") == "shared"
    # Places that are not a run's: cannot tell.
    assert mode(root / tid) is None  # the target's own directory
    assert mode(root / tid / "shared" / "workspace") is None  # copy-on-write's shared copy
    assert mode(root / ".forgespace" / "index.sqlite") is None  # bookkeeping, not an id
    assert mode(root / tid / "r-unknown" / "workspace") is None  # a run the index never saw
    assert mode(tmp_path / "elsewhere" / tid / "r-iso") is None  # outside CACHE_DIR
    # The same place reached through a link to CACHE_DIR is the same place.
    link = tmp_path / "cache-link"
    link.symlink_to(root)
    assert infer_mode(link, str(root / tid / "r-iso"), cache.index) == "isolated"
