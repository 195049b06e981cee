"""The forgespace worker: two Temporal workers in one process, the cache sweep and metrics.

- the *shared* worker polls the task queue every worker host polls (``--task-queue``, default
  ``forgespace``): it runs workflow tasks and the first activity, which tells a workflow this
  host's queue;
- the *host* worker polls this host's own queue (``host_task_queue``): get_target, the
  workflows' activities and cleanup_cache run there, next to the workspace on disk.

Both register every activity (storage activities plus the packages' activities). Workflows
that call ``get_target`` themselves on the default queue (FuzzForge style) are pinned to the
host of their ``get_target`` by ``HostAffinityInterceptor``, so they work on many hosts too.
Connection: TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE (unset address = an embedded dev server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgespace.config import Settings
from forgespace.errors import ConfigError, WorkflowMetadataError
from forgespace.temporal.activities import CacheActivities, host_task_queue
from forgespace.temporal.api import register_metadata_modes
from forgespace.temporal.client import connect
from forgespace.temporal.discovery import WorkflowPackage, discover
from forgespace.temporal.health import WorkerHealth

if TYPE_CHECKING:
    from temporalio.client import Client
    from temporalio.worker import Worker

    from forgespace.cache.metrics import MetricsServer
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.temporal.fleet import FleetAdvertiser

log = logging.getLogger(__name__)

DEFAULT_TASK_QUEUE = "forgespace"
GRACEFUL_SHUTDOWN = timedelta(seconds=10)
# /metrics and /healthz stay on the host unless the operator publishes them (--metrics-addr).
DEFAULT_METRICS_ADDR = "127.0.0.1"
# Heartbeat details reach the server at most this long after an activity reports them, so
# `forgespace run` shows live progress (the SDK's default throttle is 30-60 s).
HEARTBEAT_THROTTLE = timedelta(seconds=2)


@dataclass
class WorkerInfo:
    """What a started worker serves (printed at start-up; used by the runner and tests)."""

    task_queue: str
    host_queue: str
    host: str
    address: str
    namespace: str
    workflows: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    #: The sandbox probe's verdict, one line (``SandboxStatus.describe``).
    sandbox: str = ""


async def _sweep_loop(
    cache: WorkspaceCache, interval: float, stop: asyncio.Event, client: Client | None = None
) -> None:
    """The periodic cache sweep every CACHE_CLEANUP_INTERVAL, first at start-up: leases of
    workflows Temporal says are closed are released (``leases.release_closed_workflows``),
    then TTL + LRU eviction."""
    from forgespace.temporal.leases import release_closed_workflows

    loop = asyncio.get_running_loop()
    warned = False
    while not stop.is_set():
        if client is not None:
            try:
                await release_closed_workflows(cache, client)
            except Exception:
                log.exception("lease sweep failed (will retry in %.0fs)", interval)
        try:
            report = await loop.run_in_executor(None, cache.gc)
            freed = getattr(report, "freed_bytes", None)
            plan = getattr(report, "plan", None) or []
            log.info("cache sweep: %d entries evicted, %s bytes freed", len(plan), freed)
            _observe_sweep(True)
        except (ImportError, AttributeError, NotImplementedError) as exc:
            # The eviction module may not be installed in this build yet.
            if not warned:
                log.warning("cache sweep unavailable: %s", exc)
                warned = True
        except Exception:
            log.exception("cache sweep failed (will retry in %.0fs)", interval)
            _observe_sweep(False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(interval, 1.0))


def _observe_sweep(ok: bool) -> None:
    with contextlib.suppress(ImportError):  # metrics are optional (prometheus_client missing)
        from forgespace.cache.metrics import observe_sweep

        observe_sweep(ok)


def _start_metrics(port: int, addr: str, health: WorkerHealth) -> MetricsServer | None:
    try:
        from forgespace.cache.metrics import start_metrics_server
    except ImportError as exc:
        log.warning("Prometheus metrics unavailable (%s)", exc)
        return None
    try:
        server = start_metrics_server(port, addr, health=health)
    except OSError as exc:  # includes socket.gaierror for a host name that does not resolve
        raise ConfigError(
            f"invalid --metrics-addr/--metrics-port {addr}:{port}: cannot serve metrics there: "
            f"{exc}; expected a local address (127.0.0.1, 0.0.0.0, ::) and a free port"
        ) from exc
    host = f"[{addr}]" if ":" in addr else addr
    log.info(
        "Prometheus metrics on http://%s:%d/metrics, health on /healthz",
        host,
        server.server_port,
    )
    return server


def _temporal_probe(client: Client, loop: asyncio.AbstractEventLoop) -> Callable[[], str | None]:
    """For /healthz (a server thread): ask the frontend's health service on the worker's loop,
    bounded to a few seconds; the answer is None when it serves."""

    def problem() -> str | None:
        address = client.service_client.config.target_host
        call = client.service_client.check_health(timeout=timedelta(seconds=2))
        future = asyncio.run_coroutine_threadsafe(call, loop)
        try:
            serving = future.result(timeout=3)
        except Exception as exc:
            future.cancel()
            return f"Temporal at {address} not reachable: {exc or type(exc).__name__}"
        return None if serving else f"Temporal at {address} is up but not serving"

    return problem


def select_vertical(packages: list[WorkflowPackage], vertical: str | None) -> list[WorkflowPackage]:
    """The packages of ``vertical`` (all when None); none of it is an error naming the known."""
    if not vertical:
        return packages
    chosen = [p for p in packages if p.metadata.vertical == vertical]
    if not chosen:
        known = ", ".join(sorted({p.metadata.vertical for p in packages if p.metadata.vertical}))
        raise WorkflowMetadataError(
            f"no workflow package has vertical {vertical!r}; verticals found: {known or 'none'}"
        )
    return chosen


def _collect_activities(storage: list[Any], packages: list[WorkflowPackage]) -> list[Any]:
    """Every activity once; two different functions under one name is a package error."""
    by_name: dict[str, tuple[Any, str]] = {}
    for a in storage:
        by_name[a.__temporal_activity_definition.name] = (a, "forgespace")
    for pkg in packages:
        for a in pkg.activities:
            name = a.__temporal_activity_definition.name
            seen = by_name.get(name)
            if seen is None:
                by_name[name] = (a, pkg.name)
            elif seen[0] is not a:
                raise WorkflowMetadataError(
                    f"activity name {name!r} is defined twice: by {seen[1]} and by "
                    f"{pkg.name} ({pkg.directory / 'activities.py'})"
                )
    return [a for a, _ in by_name.values()]


async def run_worker(
    settings: Settings,
    client: Client,
    *,
    task_queue: str = DEFAULT_TASK_QUEUE,
    workflows_dirs: Sequence[str | Path] = (),
    bundled: bool = True,
    packages: list[WorkflowPackage] | None = None,
    metrics_port: int | None = None,
    metrics_addr: str = DEFAULT_METRICS_ADDR,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[WorkerInfo], None] | None = None,
    cache: WorkspaceCache | None = None,
    sweep: bool = True,
    extra_task_queues: Sequence[str] = (),
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully (in-flight activities finish
    within GRACEFUL_SHUTDOWN). Raises WorkflowMetadataError before polling anything when a
    package is invalid. ``extra_task_queues`` are polled like ``task_queue`` (FuzzForge's
    ``{vertical}-queue``)."""
    from forgespace import sandbox
    from forgespace.cache.workspace import WorkspaceCache

    if packages is None:
        packages = discover(workflows_dirs, bundled=bundled, load=True)
    # Probe before polling: FORGESPACE_SANDBOX=bwrap on a host where bwrap cannot work stops
    # the worker here with the reason; auto falls back with one warning per worker start.
    box = sandbox.configure(settings)
    cache = cache or WorkspaceCache(settings)
    host = socket.gethostname()
    info = WorkerInfo(
        task_queue=task_queue,
        host_queue=host_task_queue(task_queue, settings.cache_dir, host),
        host=host,
        address=client.service_client.config.target_host,
        namespace=client.namespace,
        workflows=[p.name for p in packages],
        sandbox=box.status.describe(),
    )
    workers = _temporal_workers(settings, client, cache, packages, info, extra_task_queues)
    stop = stop or asyncio.Event()
    health = _worker_health(settings, cache, client, info)
    metrics_server = (
        _start_metrics(metrics_port, metrics_addr, health) if metrics_port is not None else None
    )
    info.metrics_port = metrics_server.server_port if metrics_server is not None else None
    sweeper = _sweep_loop(cache, settings.cache_cleanup_interval, stop, client) if sweep else None
    try:
        await _serve(workers, health, stop, sweeper=sweeper, on_ready=on_ready, info=info)
    finally:
        workers.executor.shutdown(wait=False, cancel_futures=True)
        if metrics_server is not None:
            metrics_server.close()


def _activity_executor(settings: Settings, *, pollers: int) -> ThreadPoolExecutor:
    """The threads of the sync activities of ``pollers`` workers."""
    # Every running activity holds at most one thread, so workers of `slots` activities each
    # never wait for a thread (a sync activity queued for a thread could not heartbeat).
    return ThreadPoolExecutor(
        max_workers=pollers * settings.max_concurrent_activities,
        thread_name_prefix="forgespace-activity",
    )


def _worker_health(
    settings: Settings, cache: WorkspaceCache, client: Client, info: WorkerInfo
) -> WorkerHealth:
    """What /healthz checks: the cache's disk, the queues' workers and the Temporal frontend."""
    return WorkerHealth(
        cache_dir=Path(settings.cache_dir),
        tmp_dir=cache.layout.tmp_dir,
        task_queue=info.task_queue,
        host_queue=info.host_queue,
        temporal_problem=_temporal_probe(client, asyncio.get_running_loop()),
    )


@dataclass
class _Workers:
    """The Temporal workers of one process, the threads of their activities and the fleet
    advertiser their slots feed."""

    shared: list[Worker]
    host: Worker
    advertiser: FleetAdvertiser
    executor: ThreadPoolExecutor

    @property
    def all(self) -> tuple[Worker, ...]:
        return (*self.shared, self.host)


def _temporal_workers(
    settings: Settings,
    client: Client,
    cache: WorkspaceCache,
    packages: list[WorkflowPackage],
    info: WorkerInfo,
    extra_task_queues: Sequence[str],
) -> _Workers:
    """One worker per shared queue (``info.task_queue`` and the extra ones: workflows and
    activities) and one on the host's queue (activities only), all with every activity."""
    from temporalio.worker import Worker

    from forgespace.temporal.affinity import HostAffinityInterceptor
    from forgespace.temporal.fleet import FleetAdvertiser, SlotCountingInterceptor
    from forgespace.temporal.leases import LeaseRenewal, RunDeadline

    # Pollers: the shared queue, each extra queue and the host's queue.
    executor = _activity_executor(settings, pollers=2 + len(extra_task_queues))
    # Heartbeats renew the leases of their workflow (temporal/leases.py).
    renewal = LeaseRenewal(cache)
    # Fleet locality: this host advertises what it holds in the store the fleet shares, and
    # answers "which host holds this target?" from every host's advertisement.
    advertiser = FleetAdvertiser(
        cache,
        cache.store,
        host=info.host,
        task_queue=info.task_queue,
        host_queue=info.host_queue,
        slots=settings.max_concurrent_activities,
    )
    activities = _worker_activities(settings, cache, packages, info, executor)
    workflows = [p.workflow for p in packages if p.workflow is not None]
    # Workflows learn their metadata.yaml mode from here (no I/O in workflow code), so an
    # override is logged whoever started the run.
    register_metadata_modes({p.workflow_type: p.workspace_isolation for p in packages})
    common = _worker_options(activities, executor, slots=settings.max_concurrent_activities)
    shared = [
        Worker(
            client,
            task_queue=queue,
            workflows=workflows,
            # Workflows that call get_target themselves get their activities pinned to its host.
            interceptors=[HostAffinityInterceptor(), renewal, RunDeadline()],
            **common,
        )
        for queue in (info.task_queue, *extra_task_queues)
    ]
    host_worker = Worker(
        client,
        task_queue=info.host_queue,
        interceptors=[SlotCountingInterceptor(advertiser), renewal],
        **common,
    )
    return _Workers(shared, host_worker, advertiser, executor)


def _worker_options(
    activities: list[Any], executor: ThreadPoolExecutor, *, slots: int
) -> dict[str, Any]:
    """The options every worker of the process shares."""
    return {
        "activities": activities,
        "activity_executor": executor,
        "max_concurrent_activities": slots,
        # No eager dispatch to the worker that ran the workflow task: the server hands the
        # host-queue question to whichever worker polls for it, and a workflow that skips host
        # affinity fails visibly instead of passing by luck on one host.
        "disable_eager_activity_execution": True,
        "graceful_shutdown_timeout": GRACEFUL_SHUTDOWN,
        "max_heartbeat_throttle_interval": HEARTBEAT_THROTTLE,
        "default_heartbeat_throttle_interval": HEARTBEAT_THROTTLE,
    }


def _worker_activities(
    settings: Settings,
    cache: WorkspaceCache,
    packages: list[WorkflowPackage],
    info: WorkerInfo,
    executor: ThreadPoolExecutor,
) -> list[Any]:
    """The cache's and the fleet's activities, run_tool, and the packages' activities."""
    from forgespace.temporal.fleet import FleetActivities, FleetView
    from forgespace.temporal.tools import run_tool

    storage = CacheActivities(cache, host_queue=info.host_queue, host=info.host, executor=executor)
    fleet = FleetActivities(
        FleetView(cache.store, info.task_queue), settings, host_queue=info.host_queue
    )
    return _collect_activities([*storage.activities(), *fleet.activities(), run_tool], packages)


async def _serve(
    workers: _Workers,
    health: WorkerHealth,
    stop: asyncio.Event,
    *,
    sweeper: Coroutine[Any, Any, None] | None,
    on_ready: Callable[[WorkerInfo], None] | None,
    info: WorkerInfo,
) -> None:
    """Run the workers, the cache sweep and the fleet advertisement until ``stop`` is set."""
    sweeping: asyncio.Task[None] | None = None
    advertising: asyncio.Task[None] | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            for w in workers.all:
                await stack.enter_async_context(w)
            health.workers = workers.all
            if sweeper is not None:
                sweeping = asyncio.create_task(sweeper)
            advertising = asyncio.create_task(workers.advertiser.run(stop))
            if on_ready is not None:
                on_ready(info)
            await stop.wait()
            log.info("worker shutting down (in-flight activities get %s)", GRACEFUL_SHUTDOWN)
    finally:
        stop.set()
        if sweeper is not None and sweeping is None:
            sweeper.close()  # never started: no "coroutine was never awaited" warning
        if advertising is not None:
            # It writes "stopped" on its way out: choosers skip this host at once.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(advertising, timeout=10)
        if sweeping is not None:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping


def _print_ready(info: WorkerInfo) -> None:
    import sys

    print(
        f"forgespace worker ready: task queue {info.task_queue}, host queue {info.host_queue}, "
        f"Temporal {info.address} ({info.namespace}), "
        f"workflows: {', '.join(info.workflows) or 'none'}; {info.sandbox}",
        file=sys.stderr,
        flush=True,
    )


async def serve(
    settings: Settings,
    *,
    task_queue: str = DEFAULT_TASK_QUEUE,
    workflows_dirs: Sequence[str | Path] = (),
    bundled: bool = True,
    metrics_port: int | None = None,
    vertical: str | None = None,
    metrics_addr: str = DEFAULT_METRICS_ADDR,
) -> None:
    """`forgespace worker`: validate packages, connect (or start the embedded dev server),
    serve until SIGTERM/SIGINT. With ``vertical`` only that vertical's packages are served,
    and ``{vertical}-queue`` (FuzzForge's queue naming) is polled as well."""
    from forgespace.temporal.devserver import DevServer

    # Invalid metadata stops start-up before anything connects or polls.
    packages = select_vertical(discover(workflows_dirs, bundled=bundled, load=True), vertical)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server: DevServer | None = None
    address = settings.temporal_address
    try:
        if not address:
            server = DevServer(temporal_bin=settings.temporal_bin)
            server.start()  # main thread: the server dies with it
            address = server.address
            log.warning(
                "TEMPORAL_ADDRESS is unset: started an embedded Temporal dev server at %s "
                "(point `forgespace run` at it with TEMPORAL_ADDRESS=%s)",
                address,
                address,
            )
        client = await connect(settings, address=address)
        await run_worker(
            settings,
            client,
            task_queue=task_queue,
            packages=packages,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
            stop=stop,
            on_ready=_print_ready,
            extra_task_queues=[f"{vertical}-queue"] if vertical else [],
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if server is not None:
            await asyncio.to_thread(server.stop)
