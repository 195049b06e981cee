"""The embedded default store: a directory, ``{STORAGE_DIR}/{target_id}/target``.

Next to each object forgespace writes ``target.meta.json`` (size and sha256). Objects
dropped there by other tools have no sidecar; they work all the same and are verified by
size. Every write is temp file + fsync + rename (+ fsync of the directory), so a crash never
leaves a half-written object under its final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path

from forgespace.errors import StorageError, TargetNotFoundError
from forgespace.layout import validate_id
from forgespace.storage.base import ObjectInfo, ProgressFn, target_key, upload_source
from forgespace.storage.pack import content_id, copy_hashing, pack_directory, tree_size
from forgespace.storage.retry import CHUNK_SIZE, PartFile

SIDECAR_NAME = "target.meta.json"
RESULTS_DIRNAME = ".results"  # a leading dot is never a valid target id: no clash


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def check_result_key(key: str) -> str:
    """A result key is a relative posix path without ``..``; returned normalised."""
    norm = posixpath.normpath(key) if key else ""
    if not key or key.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise ValueError(
            f"invalid result key {key!r}: expected a relative path like 'wf-123/results.json' "
            "without '..'"
        )
    return norm


class LocalStore:
    """Targets as files under ``root`` (STORAGE_DIR); see the module docstring."""

    display_name = "local store"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def object_path(self, target_id: str) -> Path:
        """``{root}/{target_id}/target`` (the id is validated first)."""
        return self.root / target_key(validate_id(target_id))

    def _sidecar(self, target_id: str) -> Path:
        return self.object_path(target_id).with_name(SIDECAR_NAME)

    # --- upload ---------------------------------------------------------------------
    def upload_target(
        self,
        path: str | Path,
        progress: ProgressFn | None = None,
        *,
        target_id: str | None = None,
    ) -> str:
        """Store a file as-is, or a directory packed as a deterministic tar.gz.

        Returns the content id (``tree-…``/``file-…``: the same content gives the same id, and
        content the store already holds is not written again), or ``target_id`` when given
        (used as given; an object already under it is replaced)."""
        src = upload_source(path)
        if target_id is not None:
            validate_id(target_id, "target_id")
        self.root.mkdir(parents=True, exist_ok=True)
        # Packed/copied beside the objects first: a content id is known only once hashed.
        tmp = self.root / f".upload-{uuid.uuid4().hex[:12]}.tmp"
        try:
            with open(tmp, "xb") as out:
                if src.is_dir():
                    total = tree_size(src) if progress is not None else 0
                    cb = (lambda done: progress(done, total)) if progress is not None else None
                    stats = pack_directory(src, out, progress=cb)
                    size, digest, cid = (
                        stats.size,
                        stats.sha256,
                        content_id("tree", stats.tree_digest),
                    )
                else:
                    size, digest = copy_hashing(src, out, progress)
                    cid = content_id("file", digest)
                out.flush()
                os.fsync(out.fileno())
            tid = target_id or cid
            with self._id_lock(tid):
                if target_id is None and self._holds(tid):
                    return tid  # same content, already stored: nothing is written
                self._publish(tid, tmp, size, digest)
        finally:
            tmp.unlink(missing_ok=True)
        return tid

    @contextlib.contextmanager
    def _id_lock(self, target_id: str) -> Iterator[None]:
        """Serialise writers of one id (an object and its sidecar must come from one writer)."""
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{target_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _holds(self, target_id: str) -> bool:
        """The object is there, whole, as forgespace recorded it (sidecar size matches)."""
        meta = self._read_sidecar(target_id)
        try:
            size = self.object_path(target_id).stat().st_size
        except FileNotFoundError:
            return False
        return meta is not None and meta.get("size") == size

    def _publish(self, target_id: str, tmp: Path, size: int, digest: str) -> None:
        obj = self.object_path(target_id)
        fresh = not obj.parent.exists()
        obj.parent.mkdir(parents=True, exist_ok=True)
        try:
            # sidecar first: once the object is visible under its name, its metadata is too
            meta = {"size": size, "sha256": digest, "format": 1}
            _atomic_write_bytes(obj.with_name(SIDECAR_NAME), json.dumps(meta).encode())
            os.replace(tmp, obj)
            _fsync_dir(obj.parent)
        except BaseException:
            if fresh and not obj.exists():
                obj.with_name(SIDECAR_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    obj.parent.rmdir()  # the new id's folder, empty again
            raise

    # --- read -----------------------------------------------------------------------
    def _read_sidecar(self, target_id: str) -> dict[str, object] | None:
        try:
            raw = self._sidecar(target_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(raw)
            if isinstance(meta, dict) and isinstance(meta.get("size"), int):
                return meta
        except ValueError:
            pass
        # An unreadable sidecar is not proof of corruption of the object itself.
        return None

    def _info(self, target_id: str, actual_size: int) -> ObjectInfo:
        meta = self._read_sidecar(target_id)
        if meta is None:
            return ObjectInfo(size=actual_size)
        sha = meta.get("sha256")
        size = meta["size"]
        assert isinstance(size, int)
        return ObjectInfo(size=size, sha256=sha if isinstance(sha, str) else None)

    def stat_target(self, target_id: str) -> ObjectInfo:
        """Recorded size and sha256; for objects without a sidecar, the file's size."""
        obj = self.object_path(target_id)
        try:
            st = obj.stat()
        except FileNotFoundError as exc:
            raise TargetNotFoundError(
                f"target {target_id} not found in the local store ({obj} does not exist)"
            ) from exc
        return self._info(target_id, st.st_size)

    def download_target(
        self, target_id: str, dest: str | Path, progress: ProgressFn | None = None
    ) -> ObjectInfo:
        """Copy the object to ``dest`` streamed, verified; nothing at ``dest`` on failure."""
        obj = self.object_path(target_id)
        try:
            src = open(obj, "rb")  # noqa: SIM115
        except FileNotFoundError as exc:
            raise TargetNotFoundError(
                f"target {target_id} not found in the local store ({obj} does not exist)"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {obj}: {exc}") from exc
        with src, PartFile(dest) as part:
            expected = self._info(target_id, os.fstat(src.fileno()).st_size)
            while chunk := src.read(CHUNK_SIZE):
                part.write(chunk)
                if progress is not None:
                    progress(part.size, expected.size)
            return part.commit(expected, f"target {target_id} ({obj})")

    # --- delete / results -----------------------------------------------------------
    def delete_target(self, target_id: str) -> None:
        """Remove the object and its sidecar; a missing target is not an error."""
        obj = self.object_path(target_id)
        obj.unlink(missing_ok=True)
        obj.with_name(SIDECAR_NAME).unlink(missing_ok=True)
        # absent, or holds files we did not put there: leave them
        with contextlib.suppress(OSError):
            obj.parent.rmdir()

    def put_result(self, key: str, data: bytes, content_type: str = "application/json") -> str:
        """Write ``data`` to ``{root}/.results/{key}`` atomically; returns that path."""
        path = self.root / RESULTS_DIRNAME / check_result_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, data)
        return str(path)

    def list_results(self, prefix: str) -> list[str]:
        """Keys under ``{root}/.results/`` starting with ``prefix``, in its folder only."""
        folder, _, start = prefix.rpartition("/")
        base = self.root / RESULTS_DIRNAME / check_result_key(folder) if folder else None
        where = base or self.root / RESULTS_DIRNAME
        try:
            names = os.listdir(where)
        except (FileNotFoundError, NotADirectoryError):
            return []
        # A leading dot is an atomic write's temp file (or not ours).
        return sorted(
            f"{folder}/{n}" if folder else n
            for n in names
            if n.startswith(start) and not n.startswith(".") and (where / n).is_file()
        )

    def get_result(self, key: str) -> bytes:
        """The bytes of ``{root}/.results/{key}``."""
        return (self.root / RESULTS_DIRNAME / check_result_key(key)).read_bytes()


__all__ = ["LocalStore", "check_result_key"]
