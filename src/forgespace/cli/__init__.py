"""Command-line interface: a thin typer layer over the library."""

from __future__ import annotations

# Each module registers its commands on `app` / `cache_app` when imported.
from forgespace.cli import (
    cache_cmds,  # noqa: F401  (cache status|ls|gc|evict|verify)
    fleet_cmds,  # noqa: F401  (fleet status)
    store_cmds,  # noqa: F401  (upload, store ls|rm|prune)
    temporal_cmds,  # noqa: F401  (worker, run, workflows)
    workspace_cmds,  # noqa: F401  (get, cleanup, demo)
)
from forgespace.cli.app import app, main

__all__ = ["app", "main"]
