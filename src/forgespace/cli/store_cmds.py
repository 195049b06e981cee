"""`forgespace upload PATH`."""

from __future__ import annotations

from pathlib import Path

import typer

from forgespace.cli.app import app, load_settings


@app.command()
def upload(path: Path = typer.Argument(..., help="A directory, an archive or a single file.")) -> None:
    """Upload a target; prints its new id alone on the last line."""
    from forgespace.storage import open_store

    store = open_store(load_settings())
    target_id = store.upload_target(path)
    print(target_id)
