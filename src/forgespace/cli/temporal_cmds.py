"""`forgespace worker`, `forgespace run`, `forgespace workflows`."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

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
    task_queue: TaskQueue = "forgespace",
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
    dev server."""
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
            metrics_addr=metrics_addr,
        )
    )


@app.command()
def workflows(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout.")] = False,
    workflows_dir: WorkflowsDirs = None,
    bundled: Bundled = True,
) -> None:
    """List the discovered workflows with their workspace isolation modes."""
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


@app.command()
def run(
    workflow: Annotated[str, typer.Argument(help="Workflow name (see `forgespace workflows`).")],
    path: Annotated[
        Path,
        typer.Argument(exists=True, help="The target: a directory, an archive or a file."),
    ],
    runs: Annotated[int, typer.Option("--runs", min=1, help="Concurrent runs.")] = 1,
    isolation: Annotated[
        str | None,
        typer.Option("--isolation", help="Override metadata.yaml's workspace_isolation."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="KEY=VALUE workflow parameter (repeatable)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
    ] = False,
    sarif: Annotated[
        Path | None,
        typer.Option(
            "--sarif",
            help="Write each run's SARIF here (several runs: STEM-RUN_ID.SUFFIX next to it).",
        ),
    ] = None,
    task_queue: TaskQueue = "forgespace",
    workflows_dir: WorkflowsDirs = None,
    bundled: Bundled = True,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds each run may take before it is ended.")
    ] = 7200.0,
) -> None:
    """Upload PATH and run WORKFLOW on it N times at once; summary per run and cache figures."""
    require_extra("temporal", "forgespace run")
    from forgespace.temporal.runner import RunInputError, RunJob, parse_params, run_job

    try:
        params = parse_params(param or [])
    except RunInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--param") from None
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
        timeout=timedelta(seconds=timeout),
        sarif=sarif,
    )
    report = asyncio.run(run_job(settings, job, console=err_console))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    if any(r["status"] != "completed" for r in report["runs"]):
        # sys.exit, not typer.Exit: main() runs click with standalone_mode=False, which turns
        # typer.Exit into a return value that main() does not pass on.
        sys.exit(1)
