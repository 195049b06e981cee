"""The embedded dev server's port: the `temporal` CLI cannot bind port 0 and report the port it
got, so DevServer picks one; a port taken between the pick and the server's bind is replaced
by a fresh one (bounded), a port the caller gave is never replaced."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgespace.temporal import devserver
from forgespace.temporal.devserver import DevServer, DevServerError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process (here: a listening socket of the test) holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_picked_port_taken_before_the_bind_is_replaced(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    picks = iter([taken_port])
    real = devserver.free_port
    monkeypatch.setattr(
        devserver, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host)
    )
    server = DevServer(db_dir=tmp_path / "t")
    assert server.port == taken_port  # the race, made certain: the pick is already taken
    with caplog.at_level(logging.WARNING, logger="forgespace.temporal.devserver"):
        server.start()
    try:
        assert server.port != taken_port
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        assert f"port {taken_port} was taken before the dev server bound it" in caplog.text
    finally:
        server.stop()
    assert server.proc is None


def test_a_given_port_that_is_taken_is_an_error_naming_it(taken_port: int, tmp_path: Path) -> None:
    server = DevServer(port=taken_port, db_dir=tmp_path / "t")
    with pytest.raises(DevServerError, match=f"port {taken_port}") as ei:
        server.start()
    assert ei.value.port_in_use
    assert "address already in use" in str(ei.value)
    assert server.proc is None


def test_retries_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holders = []
    for _ in range(devserver.PORT_ATTEMPTS):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        holders.append(s)
    ports = iter([int(s.getsockname()[1]) for s in holders])
    monkeypatch.setattr(devserver, "free_port", lambda host="127.0.0.1": next(ports))
    try:
        server = DevServer(db_dir=tmp_path / "t")
        with pytest.raises(DevServerError, match="address already in use"):
            server.start()
        assert server.proc is None
        assert next(ports, None) is None  # every attempt used a fresh port, and no more
    finally:
        for s in holders:
            s.close()
