"""The object-store interface every backend implements (and tests may swap)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from forgespace.storage.retry import DownloadTap

# progress(bytes_done, bytes_total); called from the downloading thread, must be cheap.
ProgressFn = Callable[[int, int], None]


def upload_source(path: str | Path) -> Path:
    """Check what upload_target was given: a directory or a regular file."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"cannot upload {src}: no such file or directory")
    if not (src.is_dir() or src.is_file()):
        raise ValueError(f"cannot upload {src}: expected a directory or a regular file")
    return src


def target_key(target_id: str) -> str:
    """Object key of a target, in the bucket and under STORAGE_DIR alike."""
    return f"{target_id}/target"


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object. ``sha256`` is None for objects put by other clients."""

    size: int
    sha256: str | None = None
    etag: str | None = None


@runtime_checkable
class Store(Protocol):
    """A place targets (and workflow results) live.

    ``display_name`` is what operators read in logs ("MinIO/S3" or "local store").
    """

    display_name: str

    def upload_target(
        self,
        path: str | Path,
        progress: ProgressFn | None = None,
        *,
        target_id: str | None = None,
    ) -> str:
        """Upload a file as-is, or a directory packed as a deterministic tar.gz. Returns its
        content id (same content, same id; content already stored is not sent again), or
        ``target_id`` when given (used as given)."""
        ...

    def stat_target(self, target_id: str) -> ObjectInfo:
        """Size (and sha256 if recorded) of the target object; TargetNotFoundError if absent."""
        ...

    def download_target(
        self,
        target_id: str,
        dest: str | Path,
        progress: ProgressFn | None = None,
        *,
        tap: DownloadTap | None = None,
    ) -> ObjectInfo:
        """Stream the object into the file ``dest`` (created/overwritten), verified against
        its size and recorded sha256; retried on transient faults. TargetNotFoundError at
        once when the object does not exist; IntegrityError when bytes do not match.
        ``tap`` (optional for a backend: the cache checks the signature) lets another thread
        read the bytes while they arrive (storage.retry.DownloadTap)."""
        ...

    def delete_target(self, target_id: str) -> None:
        """Remove the target object (missing is not an error)."""
        ...

    def put_result(self, key: str, data: bytes, content_type: str = "application/json") -> str:
        """Store a workflow result under ``key`` (results bucket / prefix); return its location."""
        ...

    def result_keys(self, prefix: str) -> list[str]:
        """Result keys starting with ``prefix`` in its folder (not in subfolders), sorted;
        an empty list when nothing (not even the bucket) exists yet."""
        ...

    def get_result(self, key: str) -> bytes:
        """The bytes stored under result ``key``; FileNotFoundError when there are none."""
        ...
