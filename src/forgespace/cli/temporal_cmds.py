"""`forgespace worker`, `forgespace run`, `forgespace workflows`."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from forgespace.cli.app import app, err_console, load_settings
from forgespace.extras import require_extra

WorkflowsDirs = Annotated[
    list[Path] | None,
    typer.Option("--workflows-dir", help="Another folder of workflow packages (repeatable)."),
]
Bundled = Annotated[
    bool, typer.Option("--bundled/--no-bundled", help="Include the bundled workflows.")
]
TaskQueue = Annotated[str, typer.Option("--task-queue", help="The shared task queue.")]


@app.command()
def worker(
    task_queue: Annotated[
        str,
        typer.Option("--task-queue", envvar="WORKER_TASK_QUEUE", help="The shared task queue."),
    ] = "forgespace",
    vertical: Annotated[
        str | None,
        typer.Option(
            "--vertical",
            envvar="WORKER_VERTICAL",
            help="Serve only this vertical's workflows; also poll {vertical}-queue.",
        ),
    ] = None,
    workflows_dir: WorkflowsDirs = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve /metrics and /healthz on this port (off when unset; 0: any).",
        ),
    ] = None,
    metrics_addr: Annotated[
        str,
        typer.Option(
            "--metrics-addr",
            help="Address the metrics and /healthz server binds (0.0.0.0: every interface).",
        ),
    ] = "127.0.0.1",
    bundled: Bundled = True,
) -> None:
    """Serve workflows and activities until SIGTERM/SIGINT.

    Connects to TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE; an unset address starts an embedded
    dev server. FuzzForge's WORKER_VERTICAL, WORKER_TASK_QUEUE, MAX_CONCURRENT_ACTIVITIES and
    LOG_LEVEL are accepted too."""
    require_extra("temporal", "forgespace worker")
    from forgespace.temporal.worker import serve

    settings = load_settings()
    asyncio.run(
        serve(
            settings,
            task_queue=task_queue,
            workflows_dirs=workflows_dir or [],
            bundled=bundled,
            metrics_port=metrics_port,
            vertical=vertical,
            metrics_addr=metrics_addr,
        )
    )


workflows_app = typer.Typer(
    help="List the discovered workflows (`workflows info NAME` for one in detail).",
    invoke_without_command=True,
)
app.add_typer(workflows_app, name="workflows")


@workflows_app.callback()
def workflows(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout.")] = False,
    workflows_dir: WorkflowsDirs = None,
    bundled: Bundled = True,
) -> None:
    """List the discovered workflows with their workspace isolation modes."""
    if ctx.invoked_subcommand is not None:
        return
    require_extra("temporal", "forgespace workflows")
    from rich.table import Table

    from forgespace.cli.app import out_console
    from forgespace.temporal.discovery import discover

    packages = discover(workflows_dir or [], bundled=bundled, load=False)
    if as_json:
        print(json.dumps([p.summary() for p in packages], indent=2))
        return
    columns: tuple[str, ...] = ("name", "workspace_isolation", "version", "vertical")
    if out_console.width >= 110:  # descriptions only where they fit readably
        columns += ("description",)
    table = Table(title="workflows")
    for col in columns:
        table.add_column(col, no_wrap=col != "description")
    for p in packages:
        s = p.summary()
        table.add_row(*(s[c] for c in columns))
    out_console.print(table)


@workflows_app.command("info")
def workflows_info(
    name: Annotated[str, typer.Argument(help="Workflow name (see `forgespace workflows`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object on stdout.")] = False,
    workflows_dir: WorkflowsDirs = None,
    bundled: Bundled = True,
) -> None:
    """One workflow: description, mode, how it is started, its parameters with defaults."""
    from forgespace.cli.app import out_console
    from forgespace.temporal.discovery import discover, find_package
    from forgespace.temporal.parameters import accepted, defaults, properties

    pkg = find_package(discover(workflows_dir or [], bundled=bundled, load=False), name)
    dflt = defaults(pkg)
    params = [
        {
            "name": pname,
            "accepts": accepted(spec),
            "default": dflt.get(pname),
            "has_default": pname in dflt,
            "description": str(spec.get("description", "")).strip(),
        }
        for pname, spec in properties(pkg).items()
    ]
    info = {**pkg.summary(), "directory": str(pkg.directory), "parameters": params}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    lines = [
        f"{pkg.name} {pkg.metadata.version}  ({pkg.metadata.vertical or 'no vertical'})",
        pkg.metadata.description,
        f"workspace_isolation: {pkg.workspace_isolation}",
        f"package: {pkg.directory}",
        "parameters:" if params else "parameters: none",
    ]
    for p in params:
        default = f" = {json.dumps(p['default'], default=str)}" if p["has_default"] else ""
        lines.append(f"  {p['name']} ({p['accepts']}){default}")
        if p["description"]:
            lines.append(f"      {p['description']}")
    out_console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


# `forgespace run`'s options.
RunsOpt = Annotated[int, typer.Option("--runs", min=1, help="Concurrent runs.")]
IsolationOpt = Annotated[
    str | None,
    typer.Option("--isolation", help="Override metadata.yaml's workspace_isolation."),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="KEY=VALUE workflow parameter (repeatable)."),
]
ParamFileOpt = Annotated[
    Path | None,
    typer.Option("--param-file", help="YAML or JSON mapping of parameters (--param values win)."),
]
ReportJsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
]
SarifOpt = Annotated[
    Path | None,
    typer.Option(
        "--sarif",
        help="Write each run's SARIF here (several runs: STEM-RUN_ID.SUFFIX next to it).",
    ),
]
TimeoutOpt = Annotated[
    str,
    typer.Option(
        "--timeout",
        help="How long each run may take before it is ended: 2h, 90m, 45s, or seconds.",
    ),
]
FailOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        help="Exit 1 when a finding at or above this severity exists: high, medium or low "
        "(SARIF error=high, warning=medium, note=low; unranked findings count as high).",
    ),
]
UiOpt = Annotated[
    bool,
    typer.Option(
        "--ui", help="Embedded dev server: serve Temporal's Web UI on a free loopback port."
    ),
]
VerboseOpt = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True, help="Show the SDK's and worker's logs (-vv: debug)."
    ),
]


@app.command()
def run(
    workflow: Annotated[str, typer.Argument(help="Workflow name (see `forgespace workflows`).")],
    path: Annotated[
        Path,
        typer.Argument(exists=True, help="The target: a directory, an archive or a file."),
    ],
    runs: RunsOpt = 1,
    isolation: IsolationOpt = None,
    param: ParamOpt = None,
    param_file: ParamFileOpt = None,
    as_json: ReportJsonOpt = False,
    sarif: SarifOpt = None,
    task_queue: TaskQueue = "forgespace",
    workflows_dir: WorkflowsDirs = None,
    bundled: Bundled = True,
    timeout: TimeoutOpt = "2h",
    fail_on: FailOnOpt = None,
    ui: UiOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Upload PATH and run WORKFLOW on it N times at once; summary per run and cache figures.

    Ctrl-C (or SIGTERM) cancels the runs, waits up to 30 s for their cleanup, and exits 130."""
    require_extra("temporal", "forgespace run")
    from forgespace.cli.app import quiet_logs
    from forgespace.temporal.runner import RunInterrupted, RunJob, run_job

    quiet_logs(verbose)
    threshold = _fail_on_threshold(fail_on)
    run_timeout = _run_timeout(timeout)
    params = _run_params(param, param_file)
    settings = load_settings()
    job = RunJob(
        workflow=workflow,
        path=path,
        runs=runs,
        isolation=isolation,
        params=params,
        task_queue=task_queue,
        workflows_dirs=workflows_dir or [],
        bundled=bundled,
        timeout=timedelta(seconds=run_timeout),
        sarif=sarif,
        ui=ui,
    )
    try:
        report = asyncio.run(run_job(settings, job, console=err_console))
    except RunInterrupted as exc:
        err_console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        sys.exit(130)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    # sys.exit, not typer.Exit: main() runs click with standalone_mode=False, which turns
    # typer.Exit into a return value that main() does not pass on.
    if any(r["status"] != "completed" for r in report["runs"]):
        sys.exit(1)
    if threshold is not None and _fail_on_hits(report, threshold):
        sys.exit(1)


def _fail_on_threshold(fail_on: str | None) -> str | None:
    """--fail-on as a severity name (None when not given)."""
    from forgespace.temporal.summary import SEVERITIES

    if fail_on is None:
        return None
    threshold = fail_on.strip().lower()
    if threshold not in SEVERITIES:
        raise typer.BadParameter(
            f"{fail_on!r}: expected one of {', '.join(reversed(SEVERITIES))}",
            param_hint="--fail-on",
        )
    return threshold


def _run_timeout(timeout: str) -> float:
    """--timeout in seconds (more than 0)."""
    from forgespace.config import parse_duration

    try:
        run_timeout = parse_duration(timeout, name="duration")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--timeout") from None
    if run_timeout <= 0:
        raise typer.BadParameter(
            f"{timeout!r}: must be more than 0 (e.g. 2h, 90m, 600)", param_hint="--timeout"
        )
    return run_timeout


def _run_params(param: list[str] | None, param_file: Path | None) -> dict[str, Any]:
    """The workflow parameters: --param-file's mapping, overridden by the --param pairs."""
    from forgespace.temporal.parameters import load_param_file
    from forgespace.temporal.runner import RunInputError, parse_params

    try:
        params = parse_params(param or [])
    except RunInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--param") from None
    if param_file is not None:
        params = {**load_param_file(param_file), **params}
    return params


def _fail_on_hits(report: dict[str, Any], threshold: str) -> int:
    """How many findings of the report are at or above ``threshold`` (said on stderr)."""
    from forgespace.temporal.summary import at_or_above, severities

    hits = sum(
        at_or_above(severities(r["result"], r["findings"]), threshold) for r in report["runs"]
    )
    if hits:
        err_console.print(
            f"--fail-on {threshold}: {hits} finding(s) at or above {threshold}",
            highlight=False,
        )
    return hits
