"""Command-line interface: a thin typer layer over the library."""

from __future__ import annotations

from forgespace.cli.app import app, main

# Each module registers its commands on `app` / `cache_app` when imported.
from forgespace.cli import store_cmds  # noqa: E402,F401  (upload)
from forgespace.cli import workspace_cmds  # noqa: E402,F401  (get, cleanup, demo)
from forgespace.cli import cache_cmds  # noqa: E402,F401  (cache status|ls|gc|evict|verify)
from forgespace.cli import temporal_cmds  # noqa: E402,F401  (worker, run, workflows)

__all__ = ["app", "main"]
