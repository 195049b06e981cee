"""forgespace: a workspace per workflow run, safely and fast, while many runs share a target.

Public face only; everything else lives in private modules behind it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgespace.config import Settings, parse_duration, parse_size
from forgespace.errors import (
    ForgespaceError,
    TargetNotFoundError,
    UnsafeArchiveError,
)
from forgespace.layout import IsolationMode

if TYPE_CHECKING:
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.storage import open_store

__all__ = [
    "ForgespaceError",
    "IsolationMode",
    "Settings",
    "TargetNotFoundError",
    "UnsafeArchiveError",
    "WorkspaceCache",
    "open_store",
    "parse_duration",
    "parse_size",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported lazily so `import forgespace` (and the CLI's start-up) stays light:
    # the cache pulls in sqlite and the stores pull in boto3.
    if name == "WorkspaceCache":
        from forgespace.cache.workspace import WorkspaceCache

        return WorkspaceCache
    if name == "open_store":
        from forgespace.storage import open_store

        return open_store
    raise AttributeError(f"module 'forgespace' has no attribute {name!r}")
