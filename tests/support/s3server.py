"""A real S3 API for the tests: moto's standalone server in a subprocess, behind a proxy.

The proxy runs in the pytest process (threads) and sits between every client and moto:

- it counts requests per (method, bucket, key), so a test can prove how many times an
  object was downloaded -- including downloads made by other processes, which reach the
  proxy over TCP like any S3 client;
- it injects faults into the next N matching requests: an HTTP 500 (never reaching moto),
  a connection reset (RST) after part of the body, a clean close after part of the body
  (a short read), or a stall (part of the body, then silence: a read timeout).

Fixtures: ``s3_server`` (session), ``s3_settings``, ``any_store_settings`` (params "local",
"s3"), ``settings_env``. ``env_for(settings)`` is the plain function behind ``settings_env``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import pytest

from forgespace.config import Settings

FaultKind = Literal["500", "error", "reset", "short", "stall", "ignore-range", "partial-range"]

# Hop-by-hop headers are per connection: never forwarded in either direction.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_CHUNK = 1 << 20
_REPLAY_MAX = 16 << 20
_START_TIMEOUT = 20.0
ACCESS_KEY = "forgespace-test"
SECRET_KEY = "forgespace-test-secret"


def split_path(raw_path: str) -> tuple[str, str]:
    """(bucket, key) of a path-style request path; key is "" for bucket-level requests."""
    path = unquote(urlsplit(raw_path).path)
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


@dataclass
class _Fault:
    kind: FaultKind
    method: str
    key: str | None
    remaining: int
    after_bytes: int
    stall: float = 0.0
    status: int = 500
    code: str = "InternalError"

    def matches(self, method: str, bucket: str, key: str) -> bool:
        if self.remaining <= 0 or method != self.method:
            return False
        if self.key is None:
            return key != ""
        return self.key in (key, f"{bucket}/{key}")


@dataclass
class S3Server:
    """Handle on the running server; ``endpoint`` is what clients use (the proxy)."""

    endpoint: str
    upstream: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    _counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _served: Counter[tuple[str, str]] = field(default_factory=Counter)
    _received: Counter[tuple[str, str]] = field(default_factory=Counter)
    _faults: list[_Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- counting -------------------------------------------------------------------
    def get_count(self, key: str, bucket: str | None = None) -> int:
        """GET requests seen for object ``key`` (or "bucket/key"), in any bucket unless named."""
        return self.request_count("GET", key, bucket)

    def request_count(self, method: str, key: str, bucket: str | None = None) -> int:
        """Requests of ``method`` seen for object ``key`` (or "bucket/key")."""
        with self._lock:
            total = 0
            for (m, b, k), n in self._counts.items():
                if m != method:
                    continue
                if ((bucket is None or b == bucket) and k == key) or f"{b}/{k}" == key:
                    total += n
            return total

    def bytes_served(self, key: str) -> int:
        """Body bytes the proxy relayed for GETs of object ``key`` (or "bucket/key")."""
        with self._lock:
            return sum(n for (b, k), n in self._served.items() if key in (k, f"{b}/{k}"))

    def bytes_received(self, key: str) -> int:
        """Request body bytes clients sent for object ``key`` (or "bucket/key"): PUTs, parts."""
        with self._lock:
            return sum(n for (b, k), n in self._received.items() if key in (k, f"{b}/{k}"))

    def reset_counts(self) -> None:
        """Forget every count (faults stay armed)."""
        with self._lock:
            self._counts.clear()
            self._served.clear()
            self._received.clear()

    def _add_received(self, bucket: str, key: str, n: int) -> None:
        with self._lock:
            self._received[(bucket, key)] += n

    def _add_served(self, bucket: str, key: str, n: int) -> None:
        with self._lock:
            self._served[(bucket, key)] += n

    # --- faults ---------------------------------------------------------------------
    def inject(
        self,
        fault: FaultKind = "500",
        *,
        key: str | None = None,
        times: int = 1,
        method: str = "GET",
        after_bytes: int = 64 * 1024,
        stall: float = 5.0,
        status: int = 500,
        code: str = "InternalError",
    ) -> None:
        """Make the next ``times`` requests of ``method`` on object ``key`` (any object when
        None; "bucket/key" also accepted) fail with ``fault``:

        - "500": an S3 InternalError response; the request never reaches moto;
        - "error": the same with HTTP ``status`` and S3 error ``code`` (e.g. 403 AccessDenied);
        - "ignore-range": the request reaches moto without its Range and If-* headers, as a
          server that ignores them would answer (the whole object, 200);
        - "partial-range": a ``Range: bytes=N-`` request reaches moto as ``bytes=N-M`` with
          ``after_bytes`` bytes at most: a complete, well-formed 206 that ends before the
          object does (a server or cache that caps its range answers; the client sees a
          clean stream that is shorter than the object);
        - "reset": the real response headers and ``after_bytes`` of the body, then a TCP RST;
        - "short": the same, but an orderly close (the client sees a short read);
        - "stall": the same, then ``stall`` seconds of silence before closing (a read timeout).
        """
        kinds = ("500", "error", "reset", "short", "stall", "ignore-range", "partial-range")
        if fault not in kinds:
            raise ValueError(f"unknown fault {fault!r}: expected one of {', '.join(kinds)}")
        if fault == "500":
            status, code = 500, "InternalError"
        with self._lock:
            self._faults.append(
                _Fault(fault, method.upper(), key, times, after_bytes, stall, status, code)
            )

    def clear_faults(self) -> None:
        """Disarm every pending fault."""
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        """How many injected faults have not fired yet."""
        with self._lock:
            return sum(max(f.remaining, 0) for f in self._faults)

    def _on_request(self, method: str, bucket: str, key: str) -> _Fault | None:
        with self._lock:
            if key:
                self._counts[(method, bucket, key)] += 1
            for f in self._faults:
                if f.matches(method, bucket, key):
                    f.remaining -= 1
                    fired = dataclasses.replace(f, remaining=1)
                    self._faults = [x for x in self._faults if x.remaining > 0]
                    return fired
            return None


def _capped_range(header: str, most: int) -> str:
    """A Range of ``bytes=N-`` as ``bytes=N-(N+most-1)``; any other range unchanged."""
    m = re.fullmatch(r"bytes=(\d+)-", header.strip())
    if m is None:
        return header
    start = int(m.group(1))
    return f"bytes={start}-{start + most - 1}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection of a dead client must not pin a thread forever.
    timeout = 120
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def handle(self) -> None:
        # A client dropping its kept-alive connection is normal, not worth a traceback.
        with contextlib.suppress(OSError):
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(Exception):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _conn(self) -> http.client.HTTPConnection:
        sock = self._upstream.sock if self._upstream is not None else None
        if sock is not None and select.select([sock], [], [], 0)[0]:
            # readable while idle = EOF (moto closed it): do not send into a dead socket
            self._drop_upstream()
        if self._upstream is None:
            host, port = self.server.upstream_addr
            self._upstream = http.client.HTTPConnection(host, port, timeout=120)
        return self._upstream

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body as it arrives (Content-Length or chunked), never all in RAM."""
        bucket, key = split_path(self.path)
        for data in self._raw_body_chunks():
            if key:
                self.server.state._add_received(bucket, key, len(data))
            yield data

    def _raw_body_chunks(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until the blank line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, _CHUNK))
                    if not data:
                        raise ConnectionError("client closed mid-chunk")
                    left -= len(data)
                    yield data
                self.rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, _CHUNK))
                if not data:
                    raise ConnectionError("client closed mid-body")
                left -= len(data)
                yield data

    def _handle(self) -> None:
        method = self.command
        bucket, key = split_path(self.path)
        fault = self.server.state._on_request(method, bucket, key)
        chunked_req = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if fault is not None and fault.kind in ("500", "error"):
            for _ in self._body_chunks():
                pass
            self._send_error(fault, key)
            return
        ignored = ("range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
        drop = set(ignored) if fault is not None and fault.kind == "ignore-range" else set()
        headers = list(self.headers.items())
        if fault is not None and fault.kind == "partial-range":
            headers = [
                (n, _capped_range(v, fault.after_bytes) if n.lower() == "range" else v)
                for n, v in headers
            ]
            fault = None  # relayed in full: only the request was changed
        if drop:
            fault = None  # relayed in full: only the request was changed
        # Bodies up to _REPLAY_MAX are buffered so the request can be replayed once when a
        # kept-alive upstream connection turns out to have been closed by moto meanwhile.
        length = int(self.headers.get("Content-Length") or 0)
        body = None if chunked_req or length > _REPLAY_MAX else b"".join(self._body_chunks())
        for attempt in (0, 1):
            reused = self._upstream is not None
            conn = self._conn()
            try:
                conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() not in drop:
                        conn.putheader(name, value)
                if chunked_req:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if body is not None:
                    if body:
                        conn.send(body)
                elif chunked_req:
                    for data in self._body_chunks():
                        conn.send(b"%x\r\n%s\r\n" % (len(data), data))
                    conn.send(b"0\r\n\r\n")
                else:
                    for data in self._body_chunks():
                        conn.send(data)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException):
                self._drop_upstream()
                if attempt or not reused or body is None:
                    raise
        self._relay(resp, fault, bucket, key)

    def _send_error(self, fault: _Fault, key: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
            "<Message>injected by the test proxy</Message>"
            f"<Key>{key}</Key><RequestId>injected</RequestId></Error>"
        ).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _relay(
        self, resp: http.client.HTTPResponse, fault: _Fault | None, bucket: str, key: str
    ) -> None:
        length = resp.getheader("Content-Length")
        has_body = self.command != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
        use_chunked = has_body and length is None
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if use_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if fault is not None:
            self.send_header("Connection", "close")
        # moto closing its side (will_close) only ends the upstream connection: the client's
        # stays alive, since its response is delimited (Content-Length or chunked) anyway.
        self.end_headers()
        sent = 0
        limit = fault.after_bytes if fault is not None else None
        if has_body:
            while True:
                want = _CHUNK if limit is None else min(_CHUNK, limit - sent)
                data = resp.read(want) if want > 0 else b""
                if not data:
                    break
                sent += len(data)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if use_chunked else data)
                if self.command == "GET" and key:
                    self.server.state._add_served(bucket, key, len(data))
            if limit is None and use_chunked:
                self.wfile.write(b"0\r\n\r\n")
        if fault is not None:
            self.wfile.flush()
            self._drop_upstream()  # the rest of the body is still in flight there
            if fault.kind == "stall":
                time.sleep(fault.stall)
            if fault.kind == "reset":
                # SO_LINGER with a zero timeout turns close() into a RST. Close the fd now:
                # socketserver would shutdown(SHUT_WR) first, sending a FIN before the RST.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                os.close(self.connection.detach())
            else:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        if resp.will_close:
            self._drop_upstream()

    def _dispatch(self) -> None:
        try:
            self._handle()
        except (ConnectionError, TimeoutError, http.client.HTTPException, OSError):
            # Client or moto went away: nothing sensible to answer on this connection.
            self._drop_upstream()
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many worker processes may connect at once; the default backlog of 5 drops SYNs.
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, upstream_addr: tuple[str, int], state: S3Server | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_addr = upstream_addr
        self.state = state  # type: ignore[assignment]


# werkzeug's start-up line; with ``-p 0`` it names the port the kernel gave the server.
_RUNNING_ON = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


def _moto_command() -> list[str]:
    # Port 0: moto's server (werkzeug) binds a free port itself and logs which one, so no
    # other process can take the port between picking and binding it.
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", "0"]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_moto(log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start moto on a port it picks itself and wait (bounded) until it answers HTTP."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    proc = subprocess.Popen(
        _moto_command(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + _START_TIMEOUT
    port: int | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        if port is None:
            with open(log_path, "rb") as f:
                f.seek(offset)
                m = _RUNNING_ON.search(f.read())
            port = int(m.group(1)) if m else None
        if port is not None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                conn.close()
                return proc, port
            except OSError:
                pass
        time.sleep(0.05)
    last = log_path.read_text(errors="replace")[-2000:]
    _stop(proc)
    raise RuntimeError(
        f"moto_server did not answer on 127.0.0.1 within {_START_TIMEOUT:.0f}s; log:\n{last}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """moto + proxy for the duration of the block (also usable outside pytest)."""
    proc, port = _start_moto(log_dir / "moto_server.log")
    try:
        with proxied(port) as state:
            yield state
    finally:
        _stop(proc)


@contextlib.contextmanager
def proxied(port: int, **credentials: str) -> Iterator[S3Server]:
    """The counting, fault-injecting proxy in front of the S3 server on 127.0.0.1:``port``
    (moto, or another implementation with its ``access_key``/``secret_key``)."""
    proxy = _ProxyServer(("127.0.0.1", port))
    host, pport = proxy.server_address[:2]
    state = S3Server(
        endpoint=f"http://{host!s}:{pport}", upstream=f"http://127.0.0.1:{port}", **credentials
    )
    proxy.state = state
    thread = threading.Thread(target=proxy.serve_forever, name="s3-proxy", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server (subprocess) behind the counting, fault-injecting proxy."""
    with running_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def s3_env(server: S3Server, tmp_path: Path) -> dict[str, str]:
    """Environment of an S3-backed configuration with fresh buckets, rooted in tmp_path."""
    suffix = uuid.uuid4().hex[:12]
    return {
        "CACHE_DIR": str(tmp_path / "cache"),
        "STORAGE_DIR": str(tmp_path / "store"),
        "STORAGE_BACKEND": "s3",
        "S3_ENDPOINT": server.endpoint,
        "S3_ACCESS_KEY": server.access_key,
        "S3_SECRET_KEY": server.secret_key,
        "S3_BUCKET": f"targets-{suffix}",
        "S3_RESULTS_BUCKET": f"results-{suffix}",
        "S3_REGION": server.region,
        "S3_USE_SSL": "false",
    }


@pytest.fixture
def s3_settings(tmp_path: Path, s3_server: S3Server) -> Iterator[Settings]:
    """S3-backend settings with a fresh, unique bucket pair; CACHE_DIR under tmp_path."""
    s3_server.clear_faults()
    yield Settings.from_env(s3_env(s3_server, tmp_path))
    s3_server.clear_faults()


@pytest.fixture(params=["local", "s3"])
def any_store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """The same test on both backends: local store, then S3 (moto) with fresh buckets."""
    if request.param == "local":
        yield Settings.from_env(
            {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
        )
        return
    server: S3Server = request.getfixturevalue("s3_server")
    server.clear_faults()
    yield Settings.from_env(s3_env(server, tmp_path))
    server.clear_faults()


_SETTINGS_VARS = {
    "cache_dir": "CACHE_DIR",
    "storage_dir": "STORAGE_DIR",
    "cache_max_size": "CACHE_MAX_SIZE",
    "cache_ttl": "CACHE_TTL",
    "cache_cleanup_interval": "CACHE_CLEANUP_INTERVAL",
    "cache_lease_ttl": "CACHE_LEASE_TTL",
    "cache_lock_timeout": "CACHE_LOCK_TIMEOUT",
    "cow_backend": "CACHE_COW_BACKEND",
    "storage_backend": "STORAGE_BACKEND",
    "s3_endpoint": "S3_ENDPOINT",
    "s3_access_key": "S3_ACCESS_KEY",
    "s3_secret_key": "S3_SECRET_KEY",
    "s3_bucket": "S3_BUCKET",
    "s3_results_bucket": "S3_RESULTS_BUCKET",
    "s3_region": "S3_REGION",
    "s3_use_ssl": "S3_USE_SSL",
    "temporal_address": "TEMPORAL_ADDRESS",
    "temporal_namespace": "TEMPORAL_NAMESPACE",
    "sandbox": "FORGESPACE_SANDBOX",
    "max_concurrent_activities": "FORGESPACE_MAX_CONCURRENT_ACTIVITIES",
    "temporal_bin": "FORGESPACE_TEMPORAL_BIN",
    "log_level": "FORGESPACE_LOG_LEVEL",
    "locality_wait": "FORGESPACE_LOCALITY_WAIT",
}
# Variables that are aliases of the ones above (FuzzForge's): never left to contradict them.
_ALIAS_VARS = ("LOG_LEVEL", "MAX_CONCURRENT_ACTIVITIES", "WORKER_TASK_QUEUE", "WORKER_VERTICAL")


def env_for(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """A full environment for a subprocess that makes ``Settings.from_env()`` there equal
    ``settings``: ``base`` (default os.environ) with every forgespace variable replaced."""
    env = dict(os.environ if base is None else base)
    for var in _ALIAS_VARS:
        env.pop(var, None)
    for f in dataclasses.fields(settings):
        attr = f.name
        var = _SETTINGS_VARS.get(attr, attr.upper())  # a new field: its variable, most likely
        value = getattr(settings, attr)
        if value is None or value == f.default:
            # unset = the default: an explicit default would read as an operator's choice
            # (e.g. FORGESPACE_LOG_LEVEL=INFO overrides `run`'s quiet logs)
            env.pop(var, None)
        elif isinstance(value, bool):
            env[var] = "true" if value else "false"
        else:
            # floats/ints of sizes and durations are plain bytes / seconds: exact round trip
            env[var] = format(value, "f") if isinstance(value, float) else str(value)
    return env


@pytest.fixture
def settings_env() -> Callable[[Settings], dict[str, str]]:
    """``settings_env(settings)`` -> environment for a subprocess with the same settings."""
    return env_for
