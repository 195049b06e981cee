"""What every backend's transfers share: the retry policy and the verified download file.

``PartFile`` is how a download reaches its destination: bytes go to a hidden temp file
next to ``dest`` while hashed; ``commit`` checks size (always) and sha256 (when the object
carries one) and only then renames the file into place. On any failure the temp file is
removed, so a caller never finds a partial or unverified ``dest``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from forgespace.errors import CacheFullError, IntegrityError, is_nospace
from forgespace.storage.base import ObjectInfo

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: ``attempts`` tries in all, delays ``base * 2**n``
    (capped at ``cap``), each with up to 25% jitter so many clients do not retry in step."""

    attempts: int = 6
    base: float = 0.2
    cap: float = 5.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        d = min(self.cap, self.base * (2 ** (failures - 1)))
        return d * (1.0 + random.random() * 0.25)


class PartFile:
    """The temp file a download streams into; see the module docstring.

    Writing and hashing run on a helper thread fed through a small bounded queue, so the
    sha256 of one buffer overlaps the network (or disk) read of the next: both the socket
    reads and hashlib on large buffers release the GIL. At most ``QUEUE_DEPTH`` buffers wait;
    an error of the helper (a full disk) surfaces on the next ``write``, ``restart`` or
    ``commit``. ``size`` counts the bytes accepted, which the helper writes in order."""

    QUEUE_DEPTH = 4

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)
        self.temp = self.dest.with_name(f".{self.dest.name}.part-{uuid.uuid4().hex[:12]}")
        self._f = open(self.temp, "xb")  # noqa: SIM115 (closed in commit/abort)
        self._hasher = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.QUEUE_DEPTH)
        self._writer: threading.Thread | None = threading.Thread(
            target=self._write_loop, name=f"write {self.dest.name}", daemon=True
        )
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            data = self._queue.get()
            try:
                if data is None:
                    return
                if self._error is None:
                    self._write_now(data)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _write_now(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            if is_nospace(exc):
                raise CacheFullError(
                    exc.errno, f"no space left writing {self.dest} ({self.size} bytes written)"
                ) from exc
            raise
        self._hasher.update(data)

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Wait until every accepted buffer is written and hashed; raise the helper's error."""
        self._queue.join()
        self._raise_pending()

    def _stop(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def write(self, data: bytes) -> None:
        """Accept ``data`` (written and hashed in order by the helper); a full disk raises
        CacheFullError (never retried) here or at the latest on ``commit``."""
        self._raise_pending()
        if self._writer is None:
            raise ValueError(f"write to a closed download file for {self.dest}")
        self._queue.put(data)
        self.size += len(data)

    def restart(self) -> None:
        """Drop what was written (the object changed under us: start over)."""
        self._drain()
        self._f.seek(0)
        self._f.truncate()
        self._hasher = hashlib.sha256()
        self.size = 0

    def commit(self, expected: ObjectInfo, what: str) -> ObjectInfo:
        """Verify against ``expected`` and rename into place; IntegrityError (temp removed)
        when the size or the recorded sha256 differs. ``what`` names the object in errors."""
        try:
            self._drain()
            self._stop()
            self._f.flush()
            self._f.close()
            digest = self._hasher.hexdigest()
            if self.size != expected.size:
                raise IntegrityError(
                    f"{what}: downloaded {self.size} bytes but the object has {expected.size}"
                )
            if expected.sha256 is not None and digest != expected.sha256.lower():
                raise IntegrityError(
                    f"{what}: sha256 of the downloaded bytes is {digest} but the object "
                    f"records {expected.sha256}"
                )
            os.replace(self.temp, self.dest)
        except BaseException:
            self.abort()
            raise
        return ObjectInfo(size=self.size, sha256=digest, etag=expected.etag)

    def abort(self) -> None:
        """Stop the helper, close and remove the temp file (idempotent)."""
        self._stop()
        if not self._f.closed:
            self._f.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> PartFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
