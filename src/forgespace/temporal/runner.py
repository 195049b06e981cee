# Over 500 lines for now: `forgespace run` end to end (plan, embedded server and worker, submit,
# live progress, Ctrl-C, the result document); rendering already lives in summary.py.
"""The main job behind `forgespace run`: upload a target, run N workflow runs, report.

Without TEMPORAL_ADDRESS it starts the embedded dev server and an in-process worker; with it,
it only submits the runs and waits for the cluster's workers. Progress (including heartbeat
details of running activities) goes to stderr; the report is a plain dict of the contract's
``--json`` shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from forgespace.config import Settings
from forgespace.errors import ForgespaceError, WorkflowParameterError
from forgespace.temporal.api import CACHE_MEMO_KEY, MEMO_KEY, WorkflowRequest
from forgespace.temporal.discovery import (
    WorkflowPackage,
    discover,
    find_package,
    load_package,
    resolve_mode,
)
from forgespace.temporal.leases import DEADLINE_MEMO_KEY
from forgespace.temporal.parameters import resolve_parameters, start_arguments
from forgespace.temporal.summary import (
    detail_lines,
    findings_of,
    results_location,
    severity_counts,
    top_findings,
)
from forgespace.temporal.worker import DEFAULT_TASK_QUEUE, WorkerInfo, connect, run_worker

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

    from forgespace.temporal.devserver import DevServer

log = logging.getLogger(__name__)

DEFAULT_RUN_TIMEOUT = timedelta(hours=2)
# How long after its deadline a run has to clean up before the server closes it anyway (the
# worker's lease sweep then releases what it held).
DEADLINE_GRACE = timedelta(minutes=10)
POLL_INTERVAL = 1.0
LINE_INTERVAL = 5.0
WORKER_READY_TIMEOUT = 60.0
# How long an interrupted `forgespace run` waits for its cancelled runs' cleanup activities
# (lease ended, run directory removed) before it gives up and exits.
CANCEL_WAIT = 30.0
TOP_FINDINGS = 5


class RunInputError(ForgespaceError, ValueError):
    """`forgespace run` was given something it cannot use (path, --param, --runs)."""


class RunInterrupted(ForgespaceError):
    """`forgespace run` was interrupted (SIGINT/SIGTERM); the message says what became of the
    runs (cancelled and cleaned up, or cleanup not awaited)."""


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that parses as JSON (numbers, true/false, lists) is taken as such."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RunInputError(f"invalid --param {item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def sarif_paths(base: Path, run_ids: Sequence[str]) -> list[Path]:
    """Where each run's SARIF goes: ``base`` for one run, ``{stem}-{run_id}{suffix}`` for more."""
    if len(run_ids) == 1:
        return [base]
    suffix = base.suffix or ".sarif"
    return [base.with_name(f"{base.stem}-{rid}{suffix}") for rid in run_ids]


@dataclass
class RunState:
    """What the runner knows of one run while it goes."""

    run_id: str
    workflow_id: str
    status: str = "starting"
    step: str = ""
    details: str = ""
    last_step: str = ""
    workspace: str = ""
    workspace_isolation: str | None = None
    downloads: int = 0
    hits: int = 0
    findings: int = 0
    error: str | None = None
    result: Any = field(default_factory=dict)
    done: bool = False

    def report(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "workspace": self.workspace,
            "findings": self.findings,
            "error": self.error,
            "result": self.result,
        }


def _failure_message(exc: BaseException) -> str:
    """The innermost useful message of a workflow failure chain (type: message)."""
    parts: list[str] = []
    cur: BaseException | None = exc
    seen = 0
    while cur is not None and seen < 8:
        typ = getattr(cur, "type", None)
        msg = getattr(cur, "message", None) or str(cur)
        parts.append(f"{typ}: {msg}" if typ else f"{type(cur).__name__}: {msg}")
        cur = cur.__cause__ or getattr(cur, "cause", None)
        seen += 1
    return parts[-1] if parts else str(exc)


def _compact(details: Any, width: int = 80) -> str:
    if isinstance(details, dict):
        text = " ".join(f"{k}={v}" for k, v in details.items())
    else:
        text = str(details)
    return text if len(text) <= width else text[: width - 1] + "…"


async def _poll(client: Client, handle: WorkflowHandle[Any, Any], state: RunState) -> None:
    """Refresh ``state`` from describe(): status, running activity and heartbeat details."""
    with contextlib.suppress(Exception):
        desc = await handle.describe()
        memo = await desc.memo()
        memo = memo if isinstance(memo, dict) else {}
        ws = memo.get(MEMO_KEY)
        if isinstance(ws, dict):
            state.workspace = state.workspace or str(ws.get("path", ""))
            state.workspace_isolation = ws.get("workspace_isolation") or None
        # What each of the run's get_target calls reported (recorded worker-side).
        counts = memo.get(CACHE_MEMO_KEY)
        if isinstance(counts, dict):
            state.downloads = int(counts.get("downloads") or 0)
            state.hits = int(counts.get("hits") or 0)
        if state.done:
            return
        state.status = desc.status.name.lower() if desc.status else "unknown"
        pending = list(desc.raw_description.pending_activities)
        if not pending:
            # Between activities (the workflow decides what comes next): name what ran last.
            state.step = f"after {state.last_step}" if state.last_step else "starting"
            state.details = ""
            return
        pa = pending[-1]
        state.last_step = pa.activity_type.name
        state.step = pa.activity_type.name + (f" (attempt {pa.attempt})" if pa.attempt > 1 else "")
        state.details = ""
        if pa.heartbeat_details.payloads:
            values = await client.data_converter.decode(pa.heartbeat_details.payloads)
            if values:
                state.details = _compact(values[-1])


def _live_view(states: Sequence[RunState], title: str) -> Group:
    """One line per run: its status, current step and latest heartbeat details."""
    width = max(len(s.run_id) for s in states)
    lines: list[Text] = [Text(title, style="bold")]
    for s in states:
        color = {"completed": "green", "failed": "red"}.get(s.status, "yellow")
        line = Text(f"{s.run_id:<{width}}  ")
        line.append(f"{s.status:<9}", style=color)
        if not s.done:
            line.append(f"  {s.step}")
            if s.details:
                line.append(f"  {s.details}", style="dim")
        line.no_wrap, line.overflow = True, "ellipsis"
        lines.append(line)
    return Group(*lines)


@dataclass
class RunJob:
    """One `forgespace run` invocation."""

    workflow: str
    path: Path
    runs: int = 1
    isolation: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    task_queue: str = DEFAULT_TASK_QUEUE
    workflows_dirs: Sequence[str | Path] = ()
    bundled: bool = True
    timeout: timedelta = DEFAULT_RUN_TIMEOUT
    sarif: Path | None = None
    #: Embedded dev server only: serve Temporal's Web UI on a free loopback port.
    ui: bool = False


async def _cancel_runs(
    handles: Sequence[WorkflowHandle[Any, Any]],
    states: Sequence[RunState],
    waiters: Sequence[asyncio.Task[None]],
    console: Console,
) -> str:
    """Cancel the runs still going and wait (at most CANCEL_WAIT, or until another signal)
    for them to end, so their cleanup activities (end the lease, remove the run directory)
    run while the worker is still there. Returns the line to exit with."""
    pending = [(h, w) for h, s, w in zip(handles, states, waiters, strict=True) if not s.done]
    if not pending:
        return "interrupted (every run had already ended)"
    n = plural(len(pending), "run")
    console.print(
        f"interrupted: cancelling {n}; waiting up to {CANCEL_WAIT:.0f} s for their cleanup "
        "(Ctrl-C again to stop waiting)",
        highlight=False,
    )
    try:
        await asyncio.wait_for(
            asyncio.gather(*(h.cancel() for h, _ in pending), return_exceptions=True),
            timeout=10,
        )
        done, _ = await asyncio.wait([w for _, w in pending], timeout=CANCEL_WAIT)
    except (asyncio.CancelledError, TimeoutError):
        done = set()
    if len(done) == len(pending):
        return f"interrupted: {n} cancelled, cleanup done"
    return (
        f"interrupted: {n} cancelled, cleanup of {len(pending) - len(done)} not awaited "
        "(its lease expires after CACHE_LEASE_TTL; `forgespace cache gc` removes its run "
        "directory then)"
    )


async def _wait_result(handle: WorkflowHandle[Any, Any], state: RunState) -> None:
    from temporalio.client import WorkflowFailureError

    try:
        result = await handle.result()
    except WorkflowFailureError as exc:
        state.status = "failed"
        state.error = _failure_message(exc.cause if exc.cause is not None else exc)
    except Exception as exc:
        state.status = "failed"
        state.error = f"{type(exc).__name__}: {exc}"
    else:
        state.status = "completed"
        if isinstance(result, dict) and result.keys() >= FORGESPACE_SHAPE:
            state.findings = int(result.get("findings") or 0)
            state.workspace = str(result.get("workspace") or state.workspace)
            inner = result.get("result")
            state.result = inner if isinstance(inner, dict) else {"value": inner}
        else:
            # A design-document / FuzzForge-style workflow: its return value is the result.
            state.result = result
            state.findings = count_findings(result)
    finally:
        state.done = True


# The keys of what forgespace's own workflows return (run_in_workspace bodies).
FORGESPACE_SHAPE = frozenset({"findings", "workspace", "result"})


def count_findings(result: Any) -> int:
    """Findings in a return value of another shape: a ``findings`` count or list, a summary's
    ``total_findings``, or the results of a SARIF log (FuzzForge's habits), else 0."""
    if not isinstance(result, dict):
        return 0
    findings = result.get("findings")
    if isinstance(findings, bool):
        return 0
    if isinstance(findings, int):
        return findings
    if isinstance(findings, list):
        return len(findings)
    summary = result.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("total_findings"), int):
        return int(summary["total_findings"])
    sarif = result.get("sarif")
    if isinstance(sarif, dict) and isinstance(sarif.get("runs"), list):
        return sum(len(r.get("results") or []) for r in sarif["runs"] if isinstance(r, dict))
    return 0


async def _submit_and_wait(
    client: Client,
    job: JobPlan,
    console: Console,
) -> list[RunState]:
    """Start the job's runs, show their progress until each has ended, and return their
    states. Interrupted (SIGINT/SIGTERM), it cancels the runs and waits for their cleanup."""
    handles: list[WorkflowHandle[Any, Any]] = []
    states: list[RunState] = []
    for i in range(job.runs):
        handle, state = await _start_run(client, job, i)
        handles.append(handle)
        states.append(state)
        console.print(
            f"started run {state.run_id} (workflow id {state.workflow_id})",
            highlight=False,
            soft_wrap=True,
        )
    waiters = [
        asyncio.create_task(_wait_result(h, s)) for h, s in zip(handles, states, strict=True)
    ]
    try:
        title = f"{job.workflow} on {job.target_id} ({job.mode}, {plural(job.runs, 'run')})"
        await _watch(client, handles, states, waiters, Progress(console, states, title))
    except asyncio.CancelledError:
        # Ctrl-C / SIGTERM: do not leave the runs going with nobody waiting for them, and let
        # them clean up before the (embedded) worker goes away.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        line = await _cancel_runs(handles, states, waiters, console)
        for w in waiters:
            w.cancel()
        raise RunInterrupted(line) from None
    # Final memo read: workspace path and download flag of runs that finished between polls.
    await asyncio.gather(*(_poll(client, h, s) for h, s in zip(handles, states, strict=True)))
    return states


async def _start_run(
    client: Client, job: JobPlan, index: int
) -> tuple[WorkflowHandle[Any, Any], RunState]:
    """Start the job's run number ``index`` (from 0)."""
    run_id = f"r{index + 1}-{uuid.uuid4().hex[:10]}"
    wid = f"{job.workflow}-{job.target_id}-{run_id}"
    options: dict[str, Any] = {
        "id": wid,
        "task_queue": job.task_queue,
        # The deadline is the workflow's own timer (RunDeadline: cancel the body, clean up,
        # fail); the execution timeout only backs it up, late enough for cleanup.
        "memo": {DEADLINE_MEMO_KEY: job.timeout.total_seconds()},
        "execution_timeout": job.timeout + DEADLINE_GRACE,
    }
    if job.start_args is not None:
        # FuzzForge style: positional [target_id, *parameters]; the workflow names its run
        # by Temporal's run id (workflow.info().run_id), so the report does too.
        handle = await client.start_workflow(job.workflow_type, args=job.start_args, **options)
        run_id = handle.result_run_id or run_id
    else:
        request = WorkflowRequest(
            target_id=job.target_id,
            run_id=run_id,
            workspace_isolation=job.mode,
            parameters=dict(job.parameters),
        )
        handle = await client.start_workflow(job.workflow_type, request, **options)
    return handle, RunState(run_id=run_id, workflow_id=wid, status="running")


async def _watch(
    client: Client,
    handles: Sequence[WorkflowHandle[Any, Any]],
    states: Sequence[RunState],
    waiters: Sequence[asyncio.Task[None]],
    progress: Progress,
) -> None:
    """Poll the runs every POLL_INTERVAL and show their progress until all have ended."""
    with progress:
        while not all(w.done() for w in waiters):
            await asyncio.wait(waiters, timeout=POLL_INTERVAL)
            await asyncio.gather(
                *(_poll(client, h, s) for h, s in zip(handles, states, strict=True))
            )
            progress.show()


class Progress:
    """How the runs' progress is shown: a terminal gets one live line per run; logs (CI,
    pipes) get a line per run whenever its step changes, and its heartbeat details at most
    every LINE_INTERVAL seconds."""

    def __init__(self, console: Console, states: Sequence[RunState], title: str) -> None:
        self.console = console
        self.states = states
        self.title = title
        self.started = time.monotonic()
        self.live = (
            Live(_live_view(states, title), console=console, auto_refresh=False, transient=True)
            if console.is_terminal
            else None
        )
        self._printed: dict[str, tuple[str, str, float]] = {}

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def show(self) -> None:
        now = time.monotonic()
        if self.live is not None:
            view = _live_view(self.states, f"{self.title}, {now - self.started:.0f} s")
            self.live.update(view, refresh=True)
            return
        for s in self.states:
            if not s.done and self._line_due(s, now):
                self._printed[s.run_id] = (s.step, s.details, now)
                self.console.print(
                    f"[{now - self.started:5.0f}s] {s.run_id}: {s.status} {s.step} {s.details}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )

    def _line_due(self, s: RunState, now: float) -> bool:
        last = self._printed.get(s.run_id)
        if last is None or last[0] != s.step:
            return True
        return last[1] != s.details and (not last[1] or now - last[2] >= LINE_INTERVAL)


@dataclass
class JobPlan:
    workflow: str
    workflow_type: str
    target_id: str
    mode: str
    parameters: dict[str, Any]
    runs: int
    task_queue: str
    timeout: timedelta
    # Positional start arguments (FuzzForge style); None: one WorkflowRequest.
    start_args: list[Any] | None = None


def plan_mode(pkg: WorkflowPackage, override: str | None, source: str) -> str:
    """The mode the runs use. A workflow taking ``target_id`` chooses its own mode in its code
    (its ``get_target`` calls), which forgespace does not rewrite: an override that differs
    from its metadata.yaml is refused rather than reported as applied."""
    if pkg.takes_target_id and override:
        from forgespace.layout import IsolationMode

        if IsolationMode.parse(override).value != pkg.workspace_isolation:
            raise WorkflowParameterError(
                f"{source} {override}: workflow {pkg.name} takes target_id and chooses its "
                f"workspace isolation in its own code (metadata.yaml: "
                f"{pkg.workspace_isolation}); forgespace cannot change it. Run it without "
                f"{source}, or change the mode in {pkg.directory}"
            )
    return resolve_mode(pkg.workspace_isolation, override, workflow=pkg.name, source=source)


async def run_job(
    settings: Settings, job: RunJob, *, console: Console | None = None
) -> dict[str, Any]:
    """Run ``job`` and return the report (the contract's ``--json`` object).

    Order: everything the user can get wrong is checked first (workflow, parameters, mode,
    the package's import), then the Temporal connection (and, embedded, the in-process
    worker), and only then is the target uploaded: a mistake never leaves an object behind.
    """
    from forgespace.storage import open_store

    console = console or Console(stderr=True)
    pkg, mode, parameters = _check_job(job)
    if settings.temporal_address and settings.storage_backend == "local":
        log.warning(
            "TEMPORAL_ADDRESS is set but STORAGE_BACKEND=local: the cluster's workers can fetch "
            "the target only if they share STORAGE_DIR (%s); use STORAGE_BACKEND=s3 otherwise",
            settings.storage_dir,
        )
    store = open_store(settings)
    session = _TemporalSession()
    states: list[RunState] = []
    try:
        with _cancel_on_signals():
            client = await session.open(settings, job, console)
            console.print(f"uploading {job.path} to the {store.display_name} ...", highlight=False)
            target_id = await asyncio.to_thread(store.upload_target, job.path)
            console.print(f"target id {target_id}", highlight=False)
            plan = JobPlan(
                workflow=pkg.name,
                workflow_type=pkg.workflow_type,
                target_id=target_id,
                mode=mode,
                parameters=parameters,
                runs=job.runs,
                task_queue=job.task_queue,
                timeout=job.timeout,
                start_args=(
                    start_arguments(pkg, target_id, parameters) if pkg.takes_target_id else None
                ),
            )
            states = await _submit_and_wait(client, plan, console)
    except asyncio.CancelledError:
        # A signal before any run was started (start-up, upload): nothing to cancel.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        raise RunInterrupted("interrupted before any run started") from None
    finally:
        await session.close()

    report = _job_report(pkg.name, target_id, mode, states)
    if job.sarif is not None:
        write_sarif(report, job.sarif, console)
    print_summary(console, report, states, local=session.server is not None)
    if session.infos:  # the in-process worker's sandbox (a cluster's workers log their own)
        console.print(session.infos[0].sandbox, highlight=False)
    return report


def _check_job(job: RunJob) -> tuple[WorkflowPackage, str, dict[str, Any]]:
    """What the user can get wrong, checked before anything connects or uploads: returns the
    loaded package, the mode of the runs and their validated parameters."""
    if job.runs < 1:
        raise RunInputError(f"invalid --runs {job.runs}: expected 1 or more")
    if not job.path.exists():
        raise RunInputError(f"target path {job.path} does not exist")
    packages = discover(job.workflows_dirs, bundled=job.bundled, load=False)
    pkg = load_package(find_package(packages, job.workflow))
    params = dict(job.params)
    override = job.isolation
    source = "--isolation"
    param_mode = params.pop("workspace_isolation", None)
    if override is None and param_mode is not None:
        override, source = str(param_mode), "parameter workspace_isolation"
    mode = plan_mode(pkg, override, source)
    return pkg, mode, resolve_parameters(pkg, params)


@dataclass
class _TemporalSession:
    """The Temporal side of one `forgespace run`: without TEMPORAL_ADDRESS, the embedded dev
    server and the in-process worker, which ``close`` stops."""

    server: DevServer | None = None
    worker_task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    infos: list[WorkerInfo] = field(default_factory=list)

    async def open(self, settings: Settings, job: RunJob, console: Console) -> Client:
        """Connect (starting the embedded server and worker first when there is no cluster)."""
        from forgespace.temporal.devserver import DevServer

        address = settings.temporal_address
        if not address:
            self.server = DevServer(temporal_bin=settings.temporal_bin, ui=job.ui)
            self.server.start()  # main thread: the server dies with it
            address = self.server.address
            console.print(f"embedded Temporal dev server at {address}", highlight=False)
            if self.server.ui_url:
                console.print(f"Temporal Web UI: {self.server.ui_url}", highlight=False)
        elif job.ui:
            console.print(
                "--ui: TEMPORAL_ADDRESS is set; use that cluster's own Web UI",
                highlight=False,
            )
        client = await connect(settings, address=address)
        if self.server is not None:
            loaded = discover(job.workflows_dirs, bundled=job.bundled, load=True)
            self.worker_task = await _start_worker(
                settings, client, job, loaded, self.stop, address, self.infos
            )
        return client

    async def close(self) -> None:
        self.stop.set()
        if self.worker_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.worker_task, timeout=30)
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)


def _job_report(
    workflow: str, target_id: str, mode: str, states: Sequence[RunState]
) -> dict[str, Any]:
    """The contract's ``--json`` object."""
    downloads = sum(s.downloads for s in states)
    hits = sum(s.hits for s in states)
    # The mode the runs' get_target calls used (a workflow taking target_id picks its own).
    seen_modes = {s.workspace_isolation for s in states if s.workspace_isolation}
    if len(seen_modes) == 1:
        mode = seen_modes.pop()
    return {
        "workflow": workflow,
        "target_id": target_id,
        "workspace_isolation": mode,
        "runs": [s.report() for s in states],
        "cache": {"downloads": downloads, "hits": hits},
    }


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM cancel the running task (the runner then cancels its runs and waits
    for their cleanup); a second signal cancels that wait. Main thread only: elsewhere (a test
    calling run_job in a thread) the process's own handling applies."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[signal.Signals] = []
    if task is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, task.cancel)
            except (ValueError, RuntimeError, NotImplementedError):
                break
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _workspace_line(state: RunState, mode: str, *, local: bool) -> str:
    """Where the run's workspace is now. A run directory (isolated, copy-on-write) is removed
    by the run's cleanup, so its path is not shown as if it were still there."""
    path = state.workspace
    if not path:
        return "workspace: none reported"
    used = state.workspace_isolation or mode
    exists = os.path.lexists(path) if local else None
    if used == "shared":
        if exists is False:
            return f"workspace: {path} (shared; no longer cached)"
        return f"workspace: {path} (shared: stays cached for the next runs)"
    if exists:
        return f"workspace: {path} (still there: the workflow did not clean it up)"
    return f"workspace: removed by the run's cleanup ({used})"


def print_summary(
    console: Console, report: dict[str, Any], states: Sequence[RunState], *, local: bool
) -> None:
    """Per run: status, what was found (top findings, crashes, tests), where the results went
    and where the workspace is; then the cache line."""
    runs = report["runs"]
    mode = report["workspace_isolation"]
    failed = sum(1 for r in runs if r["status"] != "completed")
    head = f"{report['workflow']} on {report['target_id']} ({mode}): " + (
        f"{plural(len(runs), 'run')} completed" if not failed else f"{failed} of {len(runs)} failed"
    )
    lines = [head]
    for st, run in zip(states, runs, strict=True):
        result = run["result"]
        sev = severity_counts(result)
        found = plural(run["findings"], "finding") + (f" ({sev})" if sev else "")
        lines.append(f"{run['run_id']}  {run['status']}  {found}")
        details = detail_lines(result)
        # Crashes have their own lines (signature, input); listing them twice helps nobody.
        crashes = any(d.startswith("crash ") for d in details)
        top = [] if crashes else top_findings(result, TOP_FINDINGS)
        lines.extend(f"    {f.line()}" for f in top)
        listed = len(findings_of(result))
        if top and listed > len(top):
            lines.append(f"    ... {listed - len(top)} more in the results")
        lines.extend(f"    {d}" for d in details)
        loc = results_location(result)
        if loc:
            lines.append("    results: " + ", ".join(f"{k} {v}" for k, v in loc.items()))
        lines.append("    " + _workspace_line(st, mode, local=local))
        if run["error"]:
            lines.append(f"    error: {run['error']}")
    c = report["cache"]
    lines.append(
        f"cache: {plural(len(runs), 'run')}, {plural(c['downloads'], 'download')}, "
        f"{c['hits']} served from the cache"
    )
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


async def _start_worker(
    settings: Settings,
    client: Client,
    job: RunJob,
    packages: list[WorkflowPackage],
    stop: asyncio.Event,
    address: str,
    infos: list[WorkerInfo],
) -> asyncio.Task[None]:
    """The embedded run's in-process worker, once it polls (its start-up error otherwise);
    its WorkerInfo is appended to ``infos``."""
    ready = asyncio.Event()

    def on_ready(info: WorkerInfo) -> None:
        infos.append(info)
        ready.set()

    worker_task = asyncio.create_task(
        run_worker(
            settings,
            client,
            task_queue=job.task_queue,
            packages=packages,
            stop=stop,
            on_ready=on_ready,
            sweep=False,
        )
    )
    ready_wait = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait(
        {worker_task, ready_wait},
        timeout=WORKER_READY_TIMEOUT,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if worker_task in done:
        ready_wait.cancel()
        worker_task.result()  # raises the worker's start-up error
    if not ready.is_set():
        ready_wait.cancel()
        raise ForgespaceError(
            f"in-process worker not ready after {WORKER_READY_TIMEOUT:.0f}s "
            f"(task queue {job.task_queue}, Temporal {address})"
        )
    return worker_task


def write_sarif(report: dict[str, Any], base: Path, console: Console) -> list[Path]:
    """Write each run's ``result["sarif"]``; see ``sarif_paths`` for the file names."""
    runs = report["runs"]
    written: list[Path] = []
    for run, path in zip(runs, sarif_paths(base, [r["run_id"] for r in runs]), strict=True):
        result = run.get("result")
        sarif = result.get("sarif") if isinstance(result, dict) else None
        if sarif is None:
            console.print(f"run {run['run_id']}: no SARIF in its result", highlight=False)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sarif, indent=2) + "\n", encoding="utf-8")
        written.append(path)
        console.print(f"SARIF of run {run['run_id']} written to {path}", highlight=False)
    return written
