"""`forgespace upload PATH` and `forgespace store ls|rm|prune`: the object store.

``--json`` prints one JSON document on stdout (shapes in docs/operations.md; fields are only
ever added); human output is a table on stdout, notes go to stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from forgespace.cli.app import app, err_console, load_settings, out_console, store_app
from forgespace.cli.progress import transfer_progress
from forgespace.errors import ConfigError, ForgespaceError, StorageError

if TYPE_CHECKING:
    from forgespace.storage.lifecycle import ManagedStore, PrunePlan, PruneResult, StoredObject


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="A directory, an archive or a single file.")],
    target_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Store under this id instead of the content id (callers that mint their own).",
        ),
    ] = None,
    extract: Annotated[
        bool,
        typer.Option(
            "--extract",
            help="PATH is an archive or a packaged artifact (APK, JAR, wheel...): upload its "
            "safely extracted contents, so runs get a workspace instead of the file.",
        ),
    ] = False,
) -> None:
    """Upload a target; prints its id alone on the last line of stdout.

    The id is derived from the content (the same tree or file gives the same id, and content
    the store already holds is not uploaded again), unless --id names one. A directory is
    packed into a deterministic tar.gz; a file (an archive or anything else) is uploaded as-is.
    Runs get an archive extracted in their workspace, except a packaged artifact (APK, AAR, JAR,
    IPA, wheel), which stays the file it is unless uploaded with --extract.
    """
    from forgespace.storage import open_store

    _check_upload_path(path)
    settings = load_settings()
    store = open_store(settings)
    if extract:
        _upload_extracted(store, path, settings.cache_max_size, target_id)
        return
    try:
        with transfer_progress(f"uploading to {store.display_name}") as progress:
            target_id = store.upload_target(path, progress=progress, target_id=target_id)
    except OSError as exc:
        if isinstance(exc, ForgespaceError):
            raise
        raise _upload_error(exc, path, store.display_name) from exc
    err_console.print(f"uploaded {escape(str(path))} to the {store.display_name}", highlight=False)
    print(target_id, flush=True)


def _check_upload_path(path: Path) -> None:
    """PATH must be a directory or a regular file."""
    # BadParameter: a usage error, exit code 2, with the message below
    if not path.exists():
        raise typer.BadParameter(
            f"cannot upload {path}: no such file or directory "
            "(expected a directory, an archive or a single file)",
            param_hint="PATH",
        )
    if not (path.is_dir() or path.is_file()):
        raise typer.BadParameter(
            f"cannot upload {path}: not a regular file or directory", param_hint="PATH"
        )


def _upload_error(exc: OSError, path: Path, store_name: str) -> Exception:
    """What an OSError during an upload is: the store's fault (StorageError, exit 1) when it
    names a file outside PATH, else the user's PATH's (a usage error, exit 2)."""
    source = os.path.abspath(path)
    failed = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else ""
    if failed and failed != source and not failed.startswith(source + os.sep):
        # Not the user's PATH but the store (a STORAGE_DIR we may not write): exit 1.
        return StorageError(
            f"cannot upload {path}: cannot write to the {store_name}: "
            f"{exc.filename}: {exc.strerror or exc}"
        )
    # e.g. a file vanishing or unreadable mid-upload: say which, without a traceback
    return typer.BadParameter(f"cannot upload {path}: {exc}", param_hint="PATH")


# --- store ls / rm / prune ---------------------------------------------------------------
JSON_HELP = "Print one JSON document on stdout (shape in docs/operations.md)."


def _managed_store() -> tuple[ManagedStore, str]:
    """The configured store and where it is (a directory, or s3://bucket at endpoint)."""
    from forgespace.storage import open_store
    from forgespace.storage.lifecycle import ManagedStore

    store = open_store(load_settings())
    assert isinstance(store, ManagedStore)  # both backends implement it
    root = getattr(store, "root", None)
    if root is not None:
        where = str(root)
    else:
        bucket = getattr(store, "bucket", "?")
        where = f"s3://{bucket} at {getattr(store, 'endpoint', None) or 'AWS'}"
    return store, where


def _objects_table(title: str, objs: list[StoredObject]) -> None:
    from rich.table import Table

    from forgespace.cli.cache_cmds import _size, _when

    t = Table(title=title)
    t.add_column("kind")
    t.add_column("key", overflow="fold")  # ids are long and must stay copyable whole
    t.add_column("size", no_wrap=True)
    t.add_column("last upload")
    for o in objs:
        t.add_row(o.kind, escape(o.key), _size(o.size), _when(o.modified))
    out_console.print(t)


@store_app.command("ls")
def store_ls(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the targets and workflow results in the store, with size and last upload time."""
    store, where = _managed_store()
    targets, results = store.list_targets(), store.list_results()
    if as_json:
        doc = {
            "store": store.display_name,
            "location": where,
            "targets": [{"target_id": o.key, **o.to_json()} for o in targets],
            "results": [o.to_json() for o in results],
            "bytes": sum(o.size for o in targets + results),
        }
        print(json.dumps(doc, indent=2))
        return
    _objects_table(
        f"{store.display_name} {escape(where)}: {len(targets)} target(s), {len(results)} result(s)",
        targets + results,
    )


@store_app.command("rm")
def store_rm(
    target_id: Annotated[str, typer.Argument(help="The id of the target to remove.")],
) -> None:
    """Remove one target from the store (exit 3 when there is no such target).

    Caches that already hold it keep serving their copy until they evict it."""
    from forgespace.layout import validate_id

    validate_id(target_id)
    store, _where = _managed_store()
    info = store.stat_target(target_id)  # TargetNotFoundError: exit 3, names the id
    store.delete_target(target_id)
    err_console.print(
        f"removed target {escape(target_id)} ({info.size} bytes) from the {store.display_name}",
        highlight=False,
    )


def _duration(value: str | None, option: str, default: float) -> float:
    from forgespace.config import parse_duration

    if value is None:
        return default
    try:
        return parse_duration(value, name=option)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


OlderThanOpt = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        help="Remove targets and results not uploaded for this long (e.g. 30d); "
        "default: STORE_TARGET_TTL (7d) for targets, STORE_RESULT_TTL (30d) for results.",
    ),
]
TargetsOlderThanOpt = Annotated[
    str | None,
    typer.Option("--targets-older-than", help="Age limit for targets only."),
]
ResultsOlderThanOpt = Annotated[
    str | None,
    typer.Option("--results-older-than", help="Age limit for results only."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing.")]


@store_app.command("prune")
def store_prune(
    older_than: OlderThanOpt = None,
    targets_older_than: TargetsOlderThanOpt = None,
    results_older_than: ResultsOlderThanOpt = None,
    dry_run: DryRunOpt = False,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove targets and results older than their age limit, and the store's leftovers.

    Age counts from the last upload: uploading content the store already holds restarts it,
    and a target re-uploaded while prune runs is kept. The local store also loses temp files
    of uploads that died more than STORE_TEMP_GRACE (1h) ago."""
    from forgespace.storage.lifecycle import plan_prune

    settings = load_settings()
    both = _duration(older_than, "--older-than", -1.0)
    t_ttl = _duration(
        targets_older_than,
        "--targets-older-than",
        both if both >= 0 else settings.store_target_ttl,
    )
    r_ttl = _duration(
        results_older_than,
        "--results-older-than",
        both if both >= 0 else settings.store_result_ttl,
    )
    store, where = _managed_store()
    plan = plan_prune(
        store, target_ttl=t_ttl, result_ttl=r_ttl, temp_grace=settings.store_temp_grace
    )
    result = None if dry_run else plan.execute(store)
    if as_json:
        doc: dict[str, Any] = {
            "store": store.display_name,
            "location": where,
            "dry_run": dry_run,
            "targets_older_than_seconds": t_ttl,
            "results_older_than_seconds": r_ttl,
            "planned": [o.to_json() for o in plan.objects],
            "expected_freed_bytes": plan.expected_freed_bytes,
            "deleted": None if result is None else [o.to_json() for o in result.deleted],
            "kept": None if result is None else [o.to_json() for o in result.kept],
            "freed_bytes": 0 if result is None else result.freed_bytes,
        }
        print(json.dumps(doc, indent=2))
        return
    _render_prune(store.display_name, plan, result)


def _render_prune(store_name: str, plan: PrunePlan, result: PruneResult | None) -> None:
    """What prune removed (or, dry run: would remove) as a table, and what it kept."""
    from forgespace.cli.cache_cmds import _size

    if result is None:
        _objects_table(
            f"would remove {len(plan.objects)} object(s), {_size(plan.expected_freed_bytes)}",
            list(plan.objects),
        )
        return
    if result.deleted:
        _objects_table(
            f"removed {len(result.deleted)} object(s), {_size(result.freed_bytes)}",
            list(result.deleted),
        )
    for o in result.kept:
        err_console.print(
            f"kept {o.kind} {escape(o.key)}: uploaded again (or changed) since it was listed",
            highlight=False,
        )
    err_console.print(
        f"pruned {len(result.deleted)} object(s), {_size(result.freed_bytes)} from the "
        f"{store_name}",
        highlight=False,
    )


def _upload_extracted(store: Any, path: Path, max_bytes: int, target_id: str | None) -> None:
    """`upload --extract`: the archive's contents, extracted by the same safe extractor the
    cache uses (same limits, same refusals), uploaded as a directory."""
    import tempfile

    from forgespace.cache.archive import detect_archive, extract_archive

    if not path.is_file() or detect_archive(path, artifacts=True) is None:
        raise typer.BadParameter(
            f"cannot extract {path}: --extract takes an archive file (tar, tar.gz, tar.bz2, "
            "tar.xz, zip, or a zip-packaged artifact such as an APK, JAR or wheel)",
            param_hint="PATH",
        )
    with tempfile.TemporaryDirectory(prefix="forgespace-extract-") as tmp:
        tree = Path(tmp) / "contents"
        extract_archive(path, tree, max_bytes=max_bytes)
        tid = store.upload_target(tree, target_id=target_id)
    err_console.print(
        f"uploaded the contents of {escape(str(path))} to the {store.display_name}",
        highlight=False,
    )
    print(tid, flush=True)
