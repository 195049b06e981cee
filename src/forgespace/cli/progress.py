"""The transfer progress bar of `upload` and `get`: stderr, terminals only, large transfers only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from forgespace.cli.app import err_console
from forgespace.storage.base import ProgressFn

# Below this a bar would only flicker: small transfers finish before it could be read.
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


@contextmanager
def transfer_progress(what: str) -> Iterator[ProgressFn | None]:
    """A ``progress(done, total)`` callback drawing a rich bar on stderr, or None when stderr is
    not a terminal. The bar appears at the first report of a transfer of at least
    PROGRESS_MIN_BYTES (a cache hit or a small object never shows one) and vanishes after."""
    if not err_console.is_terminal:
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

    with ExitStack() as stack:
        state: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            if "bar" not in state:
                if total < PROGRESS_MIN_BYTES:
                    return
                bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=err_console,
                    transient=True,
                )
                stack.enter_context(bar)
                state["bar"], state["task"] = bar, bar.add_task(what, total=total or None)
            state["bar"].update(state["task"], completed=done, total=total or None)

        yield progress
