"""The local store's blob objects (``forgespace.storage.blobs.BlobIO``): ``_blobs/...`` keys as
files under the store's root, written atomically; a pack written in ``_blobs/tmp`` (flocked by
its writer, fsynced) is moved into place rather than copied."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from forgespace.errors import TargetNotFoundError
from forgespace.storage import blobs
from forgespace.storage.localfs import (
    ATOMIC_TMP_MARK,
    atomic_write_bytes,
    fsync_dir,
    listdir_sorted,
)
from forgespace.storage.manifest import FileEntry
from forgespace.storage.retry import CHUNK_SIZE


class LocalBlobs:
    """The BlobIO half of ``LocalStore`` (a mixin): needs ``root`` and ``blob_tmp_dir``."""

    root: Path
    blob_tmp_dir: Path

    def _blob_path(self, key: str) -> Path:
        if not key.startswith(blobs.BLOBS_PREFIX):
            raise ValueError(f"not a blob key: {key!r}")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root.joinpath(*parts)

    def blob_put(self, key: str, src: Path | bytes) -> None:
        """Write (or move, from ``blob_tmp_dir``) an object under ``_blobs/``, atomically."""
        path = self._blob_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            atomic_write_bytes(path, src)
            return
        if src.parent == self.blob_tmp_dir:
            os.replace(src, path)  # fsynced by its writer
        else:
            tmp = path.with_name(f".{path.name}{ATOMIC_TMP_MARK}{uuid.uuid4().hex[:12]}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        fsync_dir(path.parent)

    def blob_get(self, key: str) -> bytes:
        """The object's bytes; TargetNotFoundError when absent."""
        try:
            return self._blob_path(key).read_bytes()
        except FileNotFoundError as exc:
            raise TargetNotFoundError(f"{key} not found in the local store {self.root}") from exc

    def blob_stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of the object, read in 1 MiB chunks."""
        path = self._blob_path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed by the generator)
        except FileNotFoundError as exc:
            raise TargetNotFoundError(f"{key} not found in the local store {self.root}") from exc

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = end - start
                while left > 0 and (chunk := f.read(min(left, CHUNK_SIZE))):
                    left -= len(chunk)
                    yield chunk

        return chunks()

    def blob_list(self, prefix: str) -> tuple[list[tuple[str, int, float]], float]:
        """Objects directly under the folder ``prefix`` (temp files excluded)."""
        where = self._blob_path(prefix.rstrip("/"))
        out = []
        for name in listdir_sorted(where):
            if name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(where / name)
                if stat.S_ISREG(st.st_mode):
                    out.append((prefix + name, st.st_size, st.st_mtime))
        return out, time.time()

    def blob_delete(self, key: str) -> None:
        """Remove the object; missing is fine."""
        self._blob_path(key).unlink(missing_ok=True)

    def fetch_blobs(self, files: Iterable[FileEntry], sink: blobs.BlobSink) -> int:
        """Verified blobs of ``files`` into ``sink`` (forgespace.storage.blobs.fetch_blobs)."""
        return blobs.fetch_blobs(self, files, sink)


__all__ = ["LocalBlobs"]
