"""The one way forgespace connects to Temporal: address, namespace, TLS and API key.

Every client the project creates for a configured cluster (the worker, ``forgespace run``)
comes from ``connect(settings)``. TLS settings (``TEMPORAL_TLS_CERT``/``_KEY`` for mTLS,
``TEMPORAL_TLS_CA`` for a private CA) and ``TEMPORAL_API_KEY`` (Temporal Cloud) apply to
``TEMPORAL_ADDRESS``; the embedded dev server (TEMPORAL_ADDRESS unset) listens in plaintext on
loopback and is connected to without them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.config import Settings
from forgespace.errors import ConfigError

if TYPE_CHECKING:
    from temporalio.client import Client

CONNECT_TIMEOUT = 30.0
# Where the Temporal core's (Rust) own log lines go: a child of the SDK's logger, so the same
# level settings quiet or show both.
CORE_LOGGER = "temporalio.core"

_runtime_lock = threading.Lock()
_runtime_set = False


def configure_runtime() -> None:
    """Send the Temporal core's logs through Python logging (stderr) instead of stdout.

    The core's default runtime prints its warnings (e.g. "Failure must have
    ApplicationFailureInfo" when a run is cancelled) on stdout, which would corrupt
    `forgespace run --json`. Called before any client is created (``connect``, the dev server's
    health check); idempotent and safe from any thread.
    """
    global _runtime_set
    with _runtime_lock:
        if _runtime_set:
            return
        from temporalio.runtime import (
            LogForwardingConfig,
            LoggingConfig,
            Runtime,
            TelemetryConfig,
            TelemetryFilter,
        )

        logging_config = LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger(CORE_LOGGER)),
        )
        Runtime.set_default(
            Runtime(telemetry=TelemetryConfig(logging=logging_config)),
            error_if_already_set=False,
        )
        _runtime_set = True


def _read_pem(path: Path, var: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path}: cannot read it: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{var}={path}: not a PEM file (expected a '-----BEGIN ...' block)")
    return data


def connect_options(settings: Settings, *, secure: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``temporalio.client.Client.connect`` (besides the address).

    ``secure=False`` (the embedded dev server) leaves TLS and the API key out. Certificates
    are read here, so a missing or unreadable file is a ConfigError naming its variable.
    """
    from temporalio.service import TLSConfig

    opts: dict[str, Any] = {"namespace": settings.temporal_namespace}
    if not secure:
        return opts
    s = settings
    if s.temporal_tls_cert or s.temporal_tls_key or s.temporal_tls_ca:
        opts["tls"] = TLSConfig(
            server_root_ca_cert=(
                _read_pem(s.temporal_tls_ca, "TEMPORAL_TLS_CA") if s.temporal_tls_ca else None
            ),
            client_cert=(
                _read_pem(s.temporal_tls_cert, "TEMPORAL_TLS_CERT") if s.temporal_tls_cert else None
            ),
            client_private_key=(
                _read_pem(s.temporal_tls_key, "TEMPORAL_TLS_KEY") if s.temporal_tls_key else None
            ),
        )
    if s.temporal_api_key:
        opts["api_key"] = s.temporal_api_key
        # The SDK turns TLS on for an API key when `tls` is left unset (Temporal Cloud).
    return opts


async def connect(
    settings: Settings, *, address: str | None = None, timeout: float = CONNECT_TIMEOUT
) -> Client:
    """A Temporal client for ``address`` (default TEMPORAL_ADDRESS) in TEMPORAL_NAMESPACE.

    TLS and the API key apply when ``address`` is the configured TEMPORAL_ADDRESS; another
    address (the embedded dev server's) is plaintext. A server that cannot be reached within
    ``timeout`` is a DevServerError naming the address and the namespace.
    """
    from temporalio.client import Client

    from forgespace.temporal.devserver import DevServerError

    configure_runtime()
    target = address or settings.temporal_address
    if not target:
        raise ConfigError("TEMPORAL_ADDRESS is unset and no dev server address was given")
    secure = target == settings.temporal_address
    opts = connect_options(settings, secure=secure)
    try:
        return await asyncio.wait_for(Client.connect(target, **opts), timeout=timeout)
    except Exception as exc:
        tls = " over TLS" if "tls" in opts or "api_key" in opts else ""
        raise DevServerError(
            f"cannot connect to Temporal at {target}{tls} (namespace "
            f"{settings.temporal_namespace}): {exc}"
        ) from exc
