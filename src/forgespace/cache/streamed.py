"""The cold path in one pass: a tar target is extracted while it downloads.

The download runs in the calling thread as always (the store writes and hashes the object into
its temp file, storage.retry.PartFile); a helper thread follows that file through a
``DownloadTap`` and feeds the safe extractor (archive.extract_tar_stream). Nothing extracted is
trusted before the download verified its size and digest: the engine publishes only after both
the download committed and the extraction finished, and a failure of either removes the staging
directory as before. A refused member stops the download at its next chunk.

What is not streamed falls back to the file: a zip (its central directory is at the end), a
target that is no archive, a store whose ``download_target`` takes no ``tap``, and a download
that had to start over (the object changed under it).
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

from forgespace.cache.archive import ExtractStats, extract_tar_stream
from forgespace.storage.retry import DownloadStopped, DownloadTap

#: Off: every target is downloaded first and extracted after (the benchmarks' baseline).
ENABLED = True

_TAP_SUPPORT: dict[type, bool] = {}


class StopDownload(Exception):
    """Raised from the download's progress callback once the extraction failed: the bytes
    still to come are of no use. Never leaves the engine (it raises the extraction's error)."""


def accepts_tap(store: object) -> bool:
    """True when ``store.download_target`` takes the ``tap`` keyword (stores written against
    the older interface, such as tests' fakes, are downloaded first and extracted after)."""
    kind = type(store)
    known = _TAP_SUPPORT.get(kind)
    if known is None:
        try:
            params = inspect.signature(store.download_target).parameters  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        known = _TAP_SUPPORT[kind] = "tap" in params
    return known


class StreamedExtraction:
    """One helper thread extracting ``workspace`` from the download it follows."""

    def __init__(self, target_id: str, workspace: Path, *, max_bytes: int, read_only: bool) -> None:
        self.tap = DownloadTap()
        self.stats: ExtractStats | None = None
        self.error: BaseException | None = None
        self._failed = threading.Event()
        self._args = (target_id, workspace, max_bytes, read_only)
        self._thread = threading.Thread(target=self._run, name=f"extract {target_id}", daemon=True)

    def start(self) -> StreamedExtraction:
        self._thread.start()
        return self

    def _run(self) -> None:
        tid, workspace, max_bytes, read_only = self._args
        try:
            self.stats = extract_tar_stream(
                self.tap,
                workspace,
                archive=f"target {tid}",
                max_bytes=max_bytes,
                read_only=read_only,
            )
        except BaseException as exc:  # handed to the downloading thread
            self.error = exc
            self._failed.set()

    def check(self) -> None:
        """Called with each chunk of the download: stop it once the extraction failed on its
        own (a refused or corrupt member, a full disk), not because the download stopped."""
        if self._failed.is_set() and not isinstance(self.error, DownloadStopped):
            raise StopDownload

    def finish(self, *, download_ok: bool) -> None:
        """Wait for the helper (telling it first when the download failed) and close the tap."""
        if not download_ok:
            self.tap.ended(ok=False)
        self._thread.join()
        self.tap.close()

    @property
    def stopped_by_download(self) -> bool:
        """The extraction gave up because the download failed or started over."""
        return isinstance(self.error, DownloadStopped)
