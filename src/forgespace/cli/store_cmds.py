"""`forgespace upload PATH`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from forgespace.cli.app import app, err_console, load_settings
from forgespace.errors import ForgespaceError, StorageError
from forgespace.storage.base import ProgressFn

# Below this a bar would only flicker: small uploads finish before it could be read.
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


def _content_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    from forgespace.storage.pack import tree_size

    return tree_size(path)


@contextmanager
def _progress_for(path: Path, what: str) -> Iterator[ProgressFn | None]:
    """A rich bar on stderr when it is a terminal and the upload is large; else None."""
    if not err_console.is_terminal or _content_bytes(path) < PROGRESS_MIN_BYTES:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield progress


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
) -> None:
    """Upload a target; prints its id alone on the last line of stdout.

    The id is derived from the content (the same tree or file gives the same id, and content
    the store already holds is not uploaded again), unless --id names one. A directory is
    packed into a deterministic tar.gz; a file (an archive or anything else) is uploaded as-is.
    """
    from forgespace.storage import open_store

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
    store = open_store(load_settings())
    try:
        with _progress_for(path, f"uploading to {store.display_name}") as progress:
            target_id = store.upload_target(path, progress=progress, target_id=target_id)
    except OSError as exc:
        if isinstance(exc, ForgespaceError):
            raise
        source = os.path.abspath(path)
        failed = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else ""
        if failed and failed != source and not failed.startswith(source + os.sep):
            # Not the user's PATH but the store (a STORAGE_DIR we may not write): exit 1.
            raise StorageError(
                f"cannot upload {path}: cannot write to the {store.display_name}: "
                f"{exc.filename}: {exc.strerror or exc}"
            ) from exc
        # e.g. a file vanishing or unreadable mid-upload: say which, without a traceback
        raise typer.BadParameter(f"cannot upload {path}: {exc}", param_hint="PATH") from exc
    err_console.print(f"uploaded {escape(str(path))} to the {store.display_name}", highlight=False)
    print(target_id, flush=True)
