"""Time passing, without sleeping: move index rows into the past.

A test that sleeps past a 1 s TTL also gives every *fresh* entry only a second to be used
before it expires too, so a machine that stalls for a second fails it. Instead the test keeps
realistic TTLs and ages exactly the rows it means to age, straight in the index (SQLite, WAL:
safe beside the cache's own connection).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def _connect(cache_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(cache_dir / ".forgespace" / "index.sqlite", timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def age_entries(cache_dir: Path, keys: list[str], seconds: float) -> None:
    """Make these entries look created and last accessed ``seconds`` earlier."""
    with contextlib.closing(_connect(cache_dir)) as conn, conn:
        for key in keys:
            cur = conn.execute(
                "UPDATE entries SET last_access = last_access - ?, created = created - ? "
                "WHERE key = ?",
                (seconds, seconds, key),
            )
            assert cur.rowcount == 1, f"no index entry {key!r}"


def expire_leases(cache_dir: Path, lease_ids: list[str]) -> None:
    """Make these leases expired (as if their runs died one lease TTL ago)."""
    with contextlib.closing(_connect(cache_dir)) as conn, conn:
        for lease_id in lease_ids:
            cur = conn.execute(
                "UPDATE leases SET expires = 0, created = created - 1 WHERE lease_id = ?",
                (lease_id,),
            )
            assert cur.rowcount == 1, f"no lease {lease_id!r}"
