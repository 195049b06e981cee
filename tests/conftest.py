"""Fixtures used across the suite. Server fixtures live in tests/support/ and are
registered here through pytest_plugins so every test directory can use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgespace.config import Settings

pytest_plugins: list[str] = [
    "support.s3server",
    "support.temporal",
    "support.mounts",
    "support.nobody",
    "support.covsandbox",
    "support.mutation_scope",
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded-default settings rooted in this test's tmp_path (local store)."""
    return Settings.from_env(
        {
            "CACHE_DIR": str(tmp_path / "cache"),
            "STORAGE_DIR": str(tmp_path / "store"),
        }
    )
