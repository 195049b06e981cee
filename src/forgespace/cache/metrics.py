"""Prometheus metrics of the workspace cache, on a module-level registry.

The objects live in ``REGISTRY`` (not prometheus_client's global default registry, so importing
forgespace never clashes with an application's own metrics) and are readable in-process with
``snapshot()``; ``start_metrics_server(port, addr, health=...)`` serves them over HTTP with a
``/healthz`` next to them (the worker's ``--metrics-port`` / ``--metrics-addr``).

These are per-process counters (what this process served since it started); the cache-wide,
persistent counts are in the index (``forgespace cache status``).

The engine reports each get_target with one call::

    metrics.observe_get(mode, hit=..., seconds=..., downloaded_bytes=...)

Eviction reports with ``observe_eviction(reason, bytes)``. The size, entries and leases gauges
are set from the index (``refresh_from_index``) at every publish, cleanup and eviction (a
cache hit changes none of them but the lease count, and skips it: it is the hot path).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from forgespace.cache.index import CacheIndex

REGISTRY = CollectorRegistry(auto_describe=True)

HITS = Counter(
    "forgespace_cache_hits", "get_target calls served from the cache", ["mode"], registry=REGISTRY
)
MISSES = Counter(
    "forgespace_cache_misses",
    "get_target calls that had to download (or wait for another process's download)",
    ["mode"],
    registry=REGISTRY,
)
DOWNLOADS = Counter(
    "forgespace_cache_downloads", "Objects downloaded from the store", registry=REGISTRY
)
DOWNLOADED_BYTES = Counter(
    "forgespace_cache_downloaded_bytes", "Bytes downloaded from the store", registry=REGISTRY
)
EVICTIONS = Counter(
    "forgespace_cache_evictions",
    "Cache items removed by gc or make_room, by reason (ttl, lru, orphan, leftover)",
    ["reason"],
    registry=REGISTRY,
)
EVICTED_BYTES = Counter(
    "forgespace_cache_evicted_bytes", "Bytes freed by eviction, by reason", ["reason"],
    registry=REGISTRY,
)  # fmt: skip
CACHE_BYTES = Gauge(
    "forgespace_cache_bytes", "Bytes of every cache entry (as recorded at publish)",
    registry=REGISTRY,
)  # fmt: skip
CACHE_LIMIT_BYTES = Gauge(
    "forgespace_cache_limit_bytes", "CACHE_MAX_SIZE in bytes", registry=REGISTRY
)
CACHE_ENTRIES = Gauge("forgespace_cache_entries", "Cache entries in the index", registry=REGISTRY)
LIVE_LEASES = Gauge("forgespace_cache_live_leases", "Unexpired leases", registry=REGISTRY)
OLDEST_LEASE = Gauge(
    "forgespace_cache_oldest_lease_created_timestamp_seconds",
    "When the oldest unexpired lease was taken (Unix time; 0 when there is none)",
    registry=REGISTRY,
)
DOWNLOAD_FAILURES = Counter(
    "forgespace_cache_download_failures",
    "Downloads from the store that failed (after the store's own retries), by error type",
    ["error"],
    registry=REGISTRY,
)
SWEEPS = Counter(
    "forgespace_cache_sweeps", "Periodic cache sweeps of the worker, by outcome (ok, failed)",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
LAST_SWEEP = Gauge(
    "forgespace_cache_last_sweep_success_timestamp_seconds",
    "When the worker's periodic sweep last succeeded (Unix time)",
    registry=REGISTRY,
)
GET_DURATION = Histogram(
    "forgespace_get_target_duration_seconds",
    "Wall time of get_target, by mode and outcome (hit or miss)",
    ["mode", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
             60, 120, 300),
    registry=REGISTRY,
)  # fmt: skip

REASONS = ("ttl", "lru", "orphan", "leftover")


def observe_get(mode: str, hit: bool, seconds: float, downloaded_bytes: int = 0) -> None:
    """Record one get_target: its mode, whether it hit, its duration, bytes it downloaded.

    ``downloaded_bytes > 0`` also counts one download.
    """
    mode = str(mode)
    (HITS if hit else MISSES).labels(mode=mode).inc()
    GET_DURATION.labels(mode=mode, outcome="hit" if hit else "miss").observe(max(0.0, seconds))
    if downloaded_bytes > 0:
        DOWNLOADS.inc()
        DOWNLOADED_BYTES.inc(downloaded_bytes)


def observe_eviction(reason: str, freed_bytes: int) -> None:
    """Record one evicted item and the bytes it freed."""
    EVICTIONS.labels(reason=reason).inc()
    if freed_bytes > 0:
        EVICTED_BYTES.labels(reason=reason).inc(freed_bytes)


def set_cache_state(
    cache_bytes: int,
    live_leases: int,
    *,
    entries: int | None = None,
    limit: int | None = None,
    oldest_lease: float | None = None,
) -> None:
    """Set the gauges (``refresh_from_index`` computes them from the index)."""
    CACHE_BYTES.set(cache_bytes)
    LIVE_LEASES.set(live_leases)
    if entries is not None:
        CACHE_ENTRIES.set(entries)
    if limit is not None:
        CACHE_LIMIT_BYTES.set(limit)
    if oldest_lease is not None:
        OLDEST_LEASE.set(oldest_lease)


def refresh_from_index(index: CacheIndex, limit: int | None = None) -> None:
    """Set the gauges from the index (cheap: SQL aggregates and the live leases, one row per
    running run; no filesystem walk)."""
    s = index.summary()
    leases = index.live_leases() if s.live_leases else []
    oldest = min((le.created for le in leases), default=0.0)
    set_cache_state(s.bytes, s.live_leases, entries=s.entries, limit=limit, oldest_lease=oldest)


def observe_download_failure(exc: BaseException) -> None:
    """Count one failed download by the error's type."""
    DOWNLOAD_FAILURES.labels(error=type(exc).__name__).inc()


def observe_sweep(ok: bool) -> None:
    """Count one periodic sweep; a successful one also stamps the time."""
    SWEEPS.labels(outcome="ok" if ok else "failed").inc()
    if ok:
        LAST_SWEEP.set_to_current_time()


def snapshot() -> dict[str, float]:
    """Every sample of the registry by ``name{label="v",...}`` (in-process reading)."""
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def value(name: str, **labels: str) -> float:
    """One sample's value (0.0 when it was never set), e.g. ``value("forgespace_cache_hits_total",
    mode="shared")``."""
    got = REGISTRY.get_sample_value(name, labels or None)
    return 0.0 if got is None else float(got)


#: ``/healthz``'s check: (healthy, JSON-able body). Called on each request, from the server's
#: request thread; it must be quick.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: no log line
        pass


class MetricsServer(ThreadingWSGIServer):
    """The HTTP server behind ``start_metrics_server``; ``close()`` stops it."""

    def close(self) -> None:
        """Stop serving and release the port."""
        self.shutdown()
        self.server_close()


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", *, health: HealthCheck | None = None
) -> MetricsServer:
    """Serve ``REGISTRY`` at ``http://addr:port/metrics`` from a daemon thread.

    Loopback by default: exposing the metrics (and ``/healthz``) beyond the host is a choice
    (``--metrics-addr 0.0.0.0`` in a container whose port is published). With ``health``,
    ``/healthz`` answers 200 and the check's JSON body when it passes, 503 when it does not.
    ``port`` 0 takes a free port: read it from ``server.server_port``.
    """
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if health is not None and environ.get("PATH_INFO") == "/healthz":
            try:
                ok, body = health()
            except Exception as exc:  # a broken check is an unhealthy worker, not a 500
                ok, body = False, {"status": "unhealthy", "problems": [f"health check: {exc}"]}
            data = json.dumps(body, default=str).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
            return [data]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    # getaddrinfo picks IPv4 or IPv6 from the address ("::1", "0.0.0.0", a host name).
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class _Server(MetricsServer):
        address_family = family

    server = make_server(str(sockaddr[0]), port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="forgespace-metrics", daemon=True).start()
    return server
