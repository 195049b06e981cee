"""What every backend's transfers share: the retry policy and the verified download file.

``PartFile`` is how a download reaches its destination: bytes go to a hidden temp file
next to ``dest`` while hashed; ``commit`` checks size (always) and sha256 (when the object
carries one) and only then renames the file into place. On any failure the temp file is
removed, so a caller never finds a partial or unverified ``dest``.

``DownloadTap`` lets a consumer (the cache's extractor) read the bytes while they arrive: it
follows the temp file up to what the writer has written, and learns at the end whether the
download verified. What it read is only trusted by its caller once the download committed.
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

from forgespace.errors import CacheFullError, ForgespaceError, IntegrityError, is_nospace
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


class DownloadStopped(ForgespaceError):
    """What a ``DownloadTap`` reader raises when the download it follows failed or started
    over: the bytes it read so far are not the object's. The download's own error (raised in
    the downloading thread) is the one to report."""


class DownloadTap:
    """Follow a download while it is written (see the module docstring).

    The download side (``PartFile``) calls ``started``, ``wrote`` after each buffer is on
    disk, ``restarted`` when it drops what it wrote, and ``ended``; the reading side calls
    ``read``/``readinto`` from its own thread, which block until bytes are there. The tap
    holds its own descriptor of the temp file, so removing or renaming the file never breaks
    the reader; ``close`` releases it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd = -1
        self._written = 0
        self._void = False
        self._ended = False
        self._ok = False
        self.pos = 0

    # -- the download's side ---------------------------------------------------------------
    def started(self, path: Path) -> None:
        """The temp file exists (empty): open the reader's own descriptor of it."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._cond:
            self._fd = fd
            self._cond.notify_all()

    def wrote(self, total: int) -> None:
        """``total`` bytes of the object are in the temp file now."""
        with self._cond:
            self._written = total
            self._cond.notify_all()

    def restarted(self) -> None:
        """The temp file was truncated: whatever was read is void."""
        with self._cond:
            self._void = True
            self._written = 0
            self._cond.notify_all()

    def ended(self, ok: bool) -> None:
        """The download committed (verified: ``ok``) or gave up; the first word stands."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._ok = ok
            self._cond.notify_all()

    # -- the reader's side -----------------------------------------------------------------
    def _available(self, n: int) -> int:
        """Wait until bytes past ``pos`` are written (at most ``n`` of them are returned), or
        0 at the end of a verified download. Raises DownloadStopped as soon as it failed."""
        with self._cond:
            while True:
                if self._void or (self._ended and not self._ok):
                    raise DownloadStopped("the download being extracted failed or restarted")
                if self._fd >= 0 and self._written > self.pos:
                    return min(n, self._written - self.pos)
                if self._ended:
                    return 0
                self._cond.wait()

    def _still_valid(self) -> None:
        # ``restarted`` comes before the truncation: a read that overlapped it is caught here.
        with self._cond:
            if self._void or (self._ended and not self._ok):
                raise DownloadStopped("the download being extracted failed or restarted")

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at least one unless the download ended) from the position."""
        want = self._available(CHUNK_SIZE if n < 0 else n)
        if want == 0:
            return b""
        data = os.pread(self._fd, want, self.pos)
        self._still_valid()
        self.pos += len(data)
        return data

    def readinto(self, buf: memoryview | bytearray) -> int:
        """Like ``read``, into ``buf``."""
        view = memoryview(buf).cast("B")
        want = self._available(len(view))
        if want == 0:
            return 0
        got = os.preadv(self._fd, [view[:want]], self.pos)
        self._still_valid()
        self.pos += got
        return got

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the read position (absolute offsets only: the reader re-reads the head)."""
        if whence != os.SEEK_SET or offset < 0:
            raise ValueError("a download tap seeks to absolute offsets only")
        self.pos = offset
        return offset

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Release the reader's descriptor (idempotent)."""
        with self._cond:
            fd, self._fd = self._fd, -1
            if not self._ended:  # a reader still waiting must not take this for the end
                self._ended, self._ok = True, False
            self._cond.notify_all()
        if fd >= 0:
            os.close(fd)


class PartFile:
    """The temp file a download streams into; see the module docstring.

    Writing and hashing run on a helper thread fed through a small bounded queue, so the
    sha256 of one buffer overlaps the network (or disk) read of the next: both the socket
    reads and hashlib on large buffers release the GIL. At most ``QUEUE_DEPTH`` buffers wait;
    an error of the helper (a full disk) surfaces on the next ``write``, ``restart`` or
    ``commit``. ``size`` counts the bytes accepted, which the helper writes in order."""

    QUEUE_DEPTH = 4

    def __init__(self, dest: str | Path, tap: DownloadTap | None = None) -> None:
        self.dest = Path(dest)
        self.temp = self.dest.with_name(f".{self.dest.name}.part-{uuid.uuid4().hex[:12]}")
        self._f = open(self.temp, "xb")  # noqa: SIM115 (closed in commit/abort)
        self._hasher = hashlib.sha256()
        self.size = 0
        # what the helper has written (the tap's reader may read up to here)
        self._on_disk = 0
        self._tap = tap
        if tap is not None:
            try:
                tap.started(self.temp)
            except BaseException:
                self._f.close()
                self.temp.unlink(missing_ok=True)
                raise
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
        if self._tap is not None:
            self._f.flush()  # the reader reads the file by its own descriptor
            self._on_disk += len(data)
            self._tap.wrote(self._on_disk)

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
        if self._tap is not None:
            self._tap.restarted()
        self._f.seek(0)
        self._f.truncate()
        self._hasher = hashlib.sha256()
        self.size = self._on_disk = 0

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
        if self._tap is not None:
            self._tap.ended(ok=True)
        return ObjectInfo(size=self.size, sha256=digest, etag=expected.etag)

    def abort(self) -> None:
        """Stop the helper, close and remove the temp file (idempotent)."""
        if self._tap is not None:
            self._tap.ended(ok=False)
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
