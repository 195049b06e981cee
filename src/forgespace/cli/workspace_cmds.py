"""`forgespace get`, `forgespace cleanup` and `forgespace demo`."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import typer

from forgespace.cli.app import app, err_console, load_settings

_MODES_HELP = "isolated, shared or copy-on-write"


def _check_input(isolation: str, target_id: str | None, run_id: str | None) -> None:
    """Refuse a bad mode or id before the cache directory is even created."""
    from forgespace.layout import IsolationMode, validate_id

    IsolationMode.parse(isolation)
    if target_id is not None:
        validate_id(target_id, "target_id")
    if run_id is not None:
        validate_id(run_id, "run_id")


@app.command()
def get(
    target_id: str = typer.Argument(..., help="Target id (as printed by `forgespace upload`)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id (isolated/copy-on-write: one is made up when omitted)."
    ),
    isolation: str = typer.Option("isolated", "--isolation", help=_MODES_HELP),
) -> None:
    """Materialise a target's workspace; prints its path alone on the last line.

    Without --run-id, isolated and copy-on-write get a new run id (printed on stderr); shared
    takes no lease then. `forgespace cleanup PATH` ends the run."""
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.cli.progress import transfer_progress
    from forgespace.layout import IsolationMode

    _check_input(isolation, target_id, run_id)
    mode = IsolationMode.parse(isolation)
    if run_id is None and mode is not IsolationMode.SHARED:
        run_id = f"cli-{uuid.uuid4().hex[:12]}"
        err_console.print(
            f"run id {run_id} (no --run-id given; `forgespace cleanup PATH` ends the run)",
            highlight=False,
        )
    cache = WorkspaceCache(load_settings())
    with transfer_progress(f"downloading {target_id}") as progress:
        res = cache.get_target_report(target_id, run_id, mode, progress=progress)
    err_console.print(
        f"{'downloaded' if res.downloaded else 'served from cache'} ({res.mode})", highlight=False
    )
    print(res.path)


def infer_mode(cache_root: Path, path: str, index: Any) -> str | None:
    """The workspace isolation a cleanup PATH belongs to, from where it is and what the index
    recorded for its run directory; None when it cannot tell (outside CACHE_DIR, a run the
    index does not know): the engine then checks the path against the given mode."""
    from forgespace.layout import is_valid_id

    p = os.path.abspath(path)
    for base in (os.path.abspath(cache_root), os.path.realpath(cache_root)):
        if p.startswith(base + os.sep):
            parts = p[len(base) + 1 :].split(os.sep)
            break
    else:
        return None
    if len(parts) < 2 or not is_valid_id(parts[0]):
        return None
    if len(parts) == 2 and parts[1] in ("workspace", "target"):
        return "shared"
    if not is_valid_id(parts[1]) or parts[1] in ("workspace", "target", "shared"):
        return None
    entry = index.get(f"{parts[0]}/{parts[1]}")
    return str(entry.mode) if entry is not None and entry.mode else None


@app.command()
def cleanup(
    path: str = typer.Argument(..., help="A path get_target returned (or its run directory)."),
    isolation: str | None = typer.Option(
        None,
        "--isolation",
        help=f"{_MODES_HELP}; inferred from PATH (given: checked against it)",
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="shared: end this run's lease."),
) -> None:
    """End a run's lease and remove its run directory (shared: removes nothing)."""
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.layout import IsolationMode

    if isolation is not None:
        isolation = IsolationMode.parse(isolation).value
    _check_input(isolation or "isolated", None, run_id)
    cache = WorkspaceCache(load_settings())
    inferred = infer_mode(cache.layout.root, path, cache.index)
    if isolation is not None and inferred is not None and inferred != isolation:
        raise typer.BadParameter(
            f"{path} is a {inferred} workspace but --isolation {isolation} was given "
            f"(omit --isolation, or pass --isolation {inferred}); nothing was deleted",
            param_hint="--isolation",
        )
    mode = isolation or inferred or "isolated"
    cache.cleanup_cache(path, mode, run_id=run_id)
    err_console.print(f"cleaned up {path} ({mode})", highlight=False)


def _demo_source() -> Path:
    """The bundled example project, or a generated copy when running from a wheel."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "demo_project"
        if candidate.is_dir():
            return candidate
    tmp = Path(tempfile.mkdtemp(prefix="forgespace-demo-"))
    (tmp / "demo").mkdir()
    (tmp / "demo" / "__init__.py").write_text('"""demo"""\n')
    (tmp / "demo" / "greet.py").write_text('print("hello, forgespace")\n')
    return tmp


@app.command()
def demo() -> None:
    """Upload the bundled example and materialise it in all three modes (two runs each)."""
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.storage import open_store

    settings = load_settings()
    store = open_store(settings)
    src = _demo_source()
    target_id = store.upload_target(src)
    err_console.print(
        f"uploaded {src.name} to the {store.display_name} as target {target_id}",
        highlight=False,
        soft_wrap=True,
    )
    cache = WorkspaceCache(settings, store=store)
    print(f"forgespace demo: target {target_id}, CACHE_DIR={settings.cache_dir}")
    session = uuid.uuid4().hex[:6]
    results = []
    for mode in ("isolated", "shared", "copy-on-write"):
        for n in (1, 2):
            # a run id names one run: each mode's runs get their own
            run_id = f"demo-{session}-{mode.split('-')[0]}-{n}"
            res = cache.get_target_report(target_id, run_id, mode)
            p = Path(res.path)
            files = sum(1 for f in p.rglob("*") if f.is_file()) if p.is_dir() else 1
            how = "downloaded" if res.downloaded else "from-cache"
            print(f"{mode:<13}  {run_id:<24}  {how:<10}  {files:>3} files  {res.path}")
            results.append((res, run_id))
    for res, run_id in results:
        cache.cleanup_cache(res.path, res.mode, run_id=run_id)
    err_console.print(
        "cleaned up the demo runs (the shared workspace and the copy-on-write shared copy "
        "stay cached for the next runs)",
        highlight=False,
    )
