"""The embedded default store: a directory, ``{STORAGE_DIR}/{target_id}/target``.

Next to each object forgespace writes ``target.meta.json`` (size and sha256). Objects
dropped there by other tools have no sidecar; they work all the same and are verified by
size. Every write is temp file + fsync + rename (+ fsync of the directory), so a crash never
leaves a half-written object under its final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from forgespace.errors import StorageError, TargetNotFoundError
from forgespace.layout import is_valid_id, validate_id
from forgespace.storage import blobs
from forgespace.storage.base import ObjectInfo, ProgressFn, target_key, upload_source
from forgespace.storage.lifecycle import StoredObject
from forgespace.storage.local_blobs import LocalBlobs
from forgespace.storage.localfs import (
    ATOMIC_TMP_MARK,
    atomic_write_bytes,
    fsync_dir,
    is_atomic_tmp,
    listdir_sorted,
)
from forgespace.storage.manifest import (
    Manifest,
    is_manifest,
    parse_manifest,
)
from forgespace.storage.pack import content_id, copy_hashing, pack_directory, tree_size
from forgespace.storage.retry import CHUNK_SIZE, DownloadTap, PartFile

SIDECAR_NAME = "target.meta.json"
RESULTS_DIRNAME = ".results"  # a leading dot is never a valid target id: no clash
LOCKS_DIRNAME = ".locks"  # never deleted (a lock file's holder may have it open)
UPLOAD_TMP_PREFIX = ".upload-"
UPLOAD_TMP_SUFFIX = ".tmp"
BLOBS_TMP = "_blobs/tmp"  # packs being written (flocked by their writer, like upload temps)


def check_result_key(key: str) -> str:
    """A result key is a relative posix path without ``..``; returned normalised."""
    norm = posixpath.normpath(key) if key else ""
    if not key or key.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise ValueError(
            f"invalid result key {key!r}: expected a relative path like 'wf-123/results.json' "
            "without '..'"
        )
    return norm


class LocalStore(LocalBlobs):
    """Targets as files under ``root`` (STORAGE_DIR); see the module docstring."""

    display_name = "local store"

    def __init__(self, root: str | Path, *, incremental: bool = True) -> None:
        self.root = Path(root)
        #: Directories are stored as a manifest + shared blobs (forgespace.storage.blobs);
        #: False stores them as one tar.gz (the classic layout).
        self.incremental = incremental
        self.blob_tmp_dir = self.root / BLOBS_TMP

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
        if src.is_dir() and self.incremental:
            return self._upload_tree(src, progress, target_id)
        # Packed/copied beside the objects first: a content id is known only once hashed.
        tmp = self.root / f"{UPLOAD_TMP_PREFIX}{uuid.uuid4().hex[:12]}{UPLOAD_TMP_SUFFIX}"
        out = open(tmp, "xb")  # noqa: SIM115 (closed in finally, after the publish)
        try:
            # Held until the object is published: prune removes a temp file only when it can
            # take this lock (its uploader is dead), however old the file looks.
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            if src.is_dir():
                total = tree_size(src) if progress is not None else 0
                cb = (lambda done: progress(done, total)) if progress is not None else None
                stats = pack_directory(src, out, progress=cb)
                size, digest = stats.size, stats.sha256
                cid = content_id("tree", stats.tree_digest)
            else:
                size, digest = copy_hashing(src, out, progress)
                cid = content_id("file", digest)
            out.flush()
            os.fsync(out.fileno())
            tid = target_id or cid
            with self._id_lock(tid):
                if target_id is None and self._holds(tid) and self._refresh(tid):
                    return tid  # same content, already stored: nothing is written
                self._publish(tid, tmp, size, digest)
        finally:
            tmp.unlink(missing_ok=True)  # before close: the lock guards it to the end
            out.close()
        return tid

    def _upload_tree(self, src: Path, progress: ProgressFn | None, target_id: str | None) -> str:
        """A directory as a manifest, sending only the blobs the store lacks."""
        with blobs.tree_upload(self, src, progress, target_id) as (tid, data):
            tmp = self.root / f"{UPLOAD_TMP_PREFIX}{uuid.uuid4().hex[:12]}{UPLOAD_TMP_SUFFIX}"
            with open(tmp, "xb") as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
                try:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                    with self._id_lock(tid):
                        if target_id is None and self._holds(tid) and self._refresh(tid):
                            return tid
                        self._publish(tid, tmp, len(data), hashlib.sha256(data).hexdigest())
                finally:
                    tmp.unlink(missing_ok=True)
            return tid

    # --- blobs (the BlobIO object operations are LocalBlobs') ---------------------------
    def sweep_blobs(self, grace: float, *, dry_run: bool = False) -> blobs.SweepResult:
        """Delete packs no stored manifest references (forgespace.storage.blobs)."""
        return blobs.sweep_packs(self, self._manifests, grace=grace, dry_run=dry_run)

    def _manifests(self) -> Iterator[Manifest]:
        for obj in self.list_targets():
            path = self.object_path(obj.key)
            if is_manifest(path):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: no longer live
                    yield parse_manifest(path.read_bytes(), f"target {obj.key}")

    def _refresh(self, target_id: str) -> bool:
        """Restart the age of a re-uploaded object (prune counts from the last upload);
        False when its times cannot be set (another user's file): the caller re-publishes."""
        try:
            os.utime(self.object_path(target_id))
        except PermissionError:
            return False
        return True

    @contextlib.contextmanager
    def _id_lock(self, target_id: str) -> Iterator[None]:
        """Serialise writers of one id (an object and its sidecar must come from one writer)."""
        locks = self.root / LOCKS_DIRNAME
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
            atomic_write_bytes(obj.with_name(SIDECAR_NAME), json.dumps(meta).encode())
            os.replace(tmp, obj)
            fsync_dir(obj.parent)
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
        except (ValueError, RecursionError):
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
        self,
        target_id: str,
        dest: str | Path,
        progress: ProgressFn | None = None,
        *,
        tap: DownloadTap | None = None,
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
        with src, PartFile(dest, tap) as part:
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
        if not obj.parent.is_dir():
            return
        with self._id_lock(target_id):
            self._remove(target_id)

    def _remove(self, target_id: str) -> None:
        # object first: a sidecar without its object is never mistaken for a stored target
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
        atomic_write_bytes(path, data)
        return str(path)

    def result_keys(self, prefix: str) -> list[str]:
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

    # --- lifecycle (forgespace store ls / rm / prune) ----------------------------------
    def list_targets(self) -> list[StoredObject]:
        """Every ``{id}/target`` regular file under the root; ``modified`` = its mtime (set
        by the last upload, re-uploads included)."""
        out: list[StoredObject] = []
        for name in listdir_sorted(self.root):
            if not is_valid_id(name):
                continue
            try:
                st = os.lstat(self.root / name / "target")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            meta = self._read_sidecar(name)
            sha = meta.get("sha256") if meta is not None else None
            out.append(
                StoredObject(
                    "target", name, st.st_size, st.st_mtime, sha if isinstance(sha, str) else None
                )
            )
        return sorted(out, key=lambda o: o.key)

    def list_results(self) -> list[StoredObject]:
        """Every result file under ``{root}/.results/`` (temp files of writes excluded)."""
        base = self.root / RESULTS_DIRNAME
        out: list[StoredObject] = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if ATOMIC_TMP_MARK in name and name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    key = path.relative_to(base).as_posix()
                    out.append(StoredObject("result", key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def list_leftovers(self, grace: float, now: float | None = None) -> list[StoredObject]:
        """Temp files of uploads that died (their lock is free) and of interrupted sidecar or
        result writes, older than ``grace`` seconds. ``.locks/`` is never listed."""
        now = time.time() if now is None else now
        found: list[Path] = []
        for name in listdir_sorted(self.root):
            path = self.root / name
            if name.startswith(UPLOAD_TMP_PREFIX) and name.endswith(UPLOAD_TMP_SUFFIX):
                found.append(path)
            elif is_valid_id(name):
                found.extend(path / n for n in listdir_sorted(path) if is_atomic_tmp(n))
        for dirpath, _dirs, files in os.walk(self.root / RESULTS_DIRNAME):
            found.extend(Path(dirpath) / n for n in files if is_atomic_tmp(n))
        found.extend(self.blob_tmp_dir / n for n in listdir_sorted(self.blob_tmp_dir))
        for sub in (blobs.PACKS, blobs.INDEX):
            where = self.root / sub
            found.extend(where / n for n in listdir_sorted(where) if is_atomic_tmp(n))
        out: list[StoredObject] = []
        for path in found:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= grace and not _in_use(path):
                key = path.relative_to(self.root).as_posix()
                out.append(StoredObject("leftover", key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def prune_target(self, target_id: str, cutoff: float) -> bool:
        """Delete the target if its mtime is still before ``cutoff``, checked under the id
        lock an upload holds while it finds the object already stored and refreshes it."""
        obj = self.object_path(target_id)
        if not obj.parent.is_dir():
            return False
        with self._id_lock(target_id):
            try:
                if os.lstat(obj).st_mtime >= cutoff:
                    return False  # uploaded again since the plan: still wanted
            except FileNotFoundError:
                return False
            self._remove(target_id)
        return True

    def prune_result(self, key: str, cutoff: float) -> bool:
        """Delete ``.results/{key}`` if still last written before ``cutoff``; empty parent
        directories go with it."""
        base = self.root / RESULTS_DIRNAME
        path = base / check_result_key(key)
        try:
            if os.lstat(path).st_mtime >= cutoff:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        parent = path.parent
        while parent != base:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or not ours to remove): stop climbing
            parent = parent.parent
        return True

    def remove_leftover(self, obj: StoredObject, grace: float) -> bool:
        """Remove a leftover named by ``list_leftovers`` if it is still dead and old."""
        path = self.root / obj.key
        if obj.kind != "leftover" or ".." in Path(obj.key).parts or LOCKS_DIRNAME in obj.key:
            raise ValueError(f"not a leftover of {self}: {obj.key!r}")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # an upload is alive and holds it
            st = os.fstat(fd)
            if time.time() - st.st_mtime < grace:
                return False
            # still the same file under that name (not replaced since we opened it)
            if os.lstat(path).st_ino != st.st_ino:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
        return True


def _in_use(path: Path) -> bool:
    """Whether a live upload holds the file's flock (only upload temp files are locked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


__all__ = ["LocalStore", "check_result_key"]
