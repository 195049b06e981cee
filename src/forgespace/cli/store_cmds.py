"""`forgespace upload PATH`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from forgespace.cli.app import app, err_console, load_settings
from forgespace.cli.progress import transfer_progress
from forgespace.errors import ForgespaceError, StorageError


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
        with transfer_progress(f"uploading to {store.display_name}") as progress:
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
