"""Incremental storage of directories: content-addressed blobs in packs, shared by all targets.

A directory uploaded incrementally is stored as a *manifest* (``forgespace.storage.manifest``)
under the usual key ``{target_id}/target``, and the bytes of its files as *blobs* (one per
distinct file content, named by its sha256) concatenated into *packs*:

- ``_blobs/packs/{sha256 of the pack}``: blobs back to back, each raw or one zlib stream;
- ``_blobs/index/{same}``: the pack's index (gzip'd JSON: digest -> offset, length, codec,
  size), written after its pack; an upload reads every index whose pack exists to learn what
  the store already holds, and sends only the blobs it lacks, in one new pack (or a few);
- ``_blobs/leases/{uuid}``: an upload in progress (see below); ``_blobs/sweeps/{uuid}``: a
  blob sweep in progress.

No key under ``_blobs/`` can be a target id (ids start with a letter or digit), so listings of
targets never see them. Packs instead of one object per file: 20,000 PUTs are far slower than
a few, on S3 and on a local disk (a few fsyncs instead of 20,000).

**Uploads** read each file once (``store_tree``): the tree is walked first without reading
anything (a tree refused for a link leaving it or a device costs nothing), then every file is
read, hashed and, when its content is new to the store and to this upload, compressed into the
open pack (isal level 1, the classic tar.gz's level; a file over ``_WHOLE_MAX`` chunk by
chunk, cut off the pack again when its digest turns out to be known). The digest recorded is
the digest of the bytes stored, both taken from the same read. A pack past ``PACK_MAX`` is
sent (then its index) on a helper thread while the next one is written; the manifest is
published only after every pack and index is stored.

**Downloads** fetch only the blobs a host lacks, with one ranged GET per run of nearby blobs
of a pack (gaps up to ``COALESCE_GAP`` are read through), and verify every blob's size and
sha256 before it is handed on.

**Sweeping** (``store prune``): a pack no manifest references is deleted once older than the
grace period. An upload may be about to reference a pack no manifest references yet (it read
the index, its manifest is not published): uploads and sweeps exclude each other through
markers, each writing its own before it looks for the other's. The upload writes its lease,
then waits while a sweep marker is live; the sweep writes its marker, then gives up if any
lease is live. Whichever wrote second sees the first (S3 and a local directory are both
strongly consistent), so a sweep never runs while an upload it could harm is between reading
the index and publishing its manifest. A sweep deletes only within ``SWEEP_DEADLINE`` seconds
of writing its marker, and uploads ignore markers older than ``SWEEP_TTL`` (a crashed
sweep's). An upload re-writes its lease every ``LEASE_RENEW`` seconds while it runs, so a lease
not renewed for ``LEASE_TTL`` is a crashed upload's, ignored and removed (a killed upload holds
sweeps back for minutes, not the hours a long upload may take); an upload that could not renew
its lease for ``LEASE_STALE`` publishes nothing (a sweep may have taken its lease for dead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import itertools
import json
import logging
import os
import stat
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from isal import igzip, isal_zlib

from forgespace.errors import ForgespaceError, IntegrityError, StorageError, TargetNotFoundError
from forgespace.storage.manifest import (
    Entry,
    FileEntry,
    Manifest,
    TreeWalk,
    blob_problem,
    encode_manifest,
    tree_digest,
    walk_tree,
)
from forgespace.storage.pack import _GZIP_LEVEL, content_id

log = logging.getLogger(__name__)

BLOBS_PREFIX = "_blobs/"
PACKS = BLOBS_PREFIX + "packs/"
INDEX = BLOBS_PREFIX + "index/"
LEASES = BLOBS_PREFIX + "leases/"
SWEEPS = BLOBS_PREFIX + "sweeps/"
# A new pack starts past this many stored bytes: a large tree makes several, so sending one
# overlaps writing the next (docs/benchmarks.md, incremental targets), and
# each stays below S3Store's multipart threshold.
PACK_MAX = 48 * 1024 * 1024
COALESCE_GAP = 1024 * 1024  # unwanted bytes read through rather than opening another range
RANGE_MAX = 64 * 1024 * 1024  # bytes one ranged GET asks for at most (unless one blob is larger)
LEASE_TTL = 600.0  # a lease not renewed for this long is a crashed upload's
LEASE_RENEW = 30.0  # how often a running upload re-writes its lease
LEASE_STALE = LEASE_TTL / 2  # unrenewed this long: the upload refuses to publish (margin)
SWEEP_TTL = 60.0
SWEEP_DEADLINE = 20.0
_COMPRESS_MIN = 64  # smaller blobs are stored raw: a zlib header would not pay off
_CHUNK = 1 << 20
_WHOLE_MAX = 4 * _CHUNK  # larger files are read, hashed and compressed chunk by chunk
_LEVEL = _GZIP_LEVEL  # the classic tar.gz's level: same speed per byte, comparable size

# What reading a damaged index can raise: gzip reports a bad deflate stream as zlib.error (not
# an OSError), json a structure nested too deep as RecursionError.
_UNREADABLE_INDEX = (ValueError, KeyError, TypeError, OSError, EOFError, zlib.error, RecursionError)

Listing = list[tuple[str, int, float]]  # (key, size, modified by the store's clock)


class BlobIO(Protocol):
    """The few object operations blobs need; LocalStore and S3Store implement them."""

    def blob_put(self, key: str, src: Path | bytes) -> None:
        """Store the file ``src`` (or bytes) under ``key``, atomically. A file in
        ``blob_tmp_dir`` (when the store has one) may be moved rather than copied."""
        ...

    def blob_get(self, key: str) -> bytes:
        """The whole object; TargetNotFoundError when absent."""
        ...

    def blob_stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the object, in chunks; TargetNotFoundError when absent."""
        ...

    def blob_list(self, prefix: str) -> tuple[Listing, float]:
        """Objects under ``prefix``, and the store's clock now (markers are aged by it)."""
        ...

    def blob_delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""
        ...


@dataclass(frozen=True)
class BlobLoc:
    """Where a blob is stored."""

    pack: str
    offset: int
    length: int
    codec: str
    size: int


@dataclass
class UploadStats:
    """What an incremental upload sent: new blobs, their bytes, and pack bytes sent."""

    files: int = 0
    new_blobs: int = 0
    sent_bytes: int = 0
    packs: list[str] = field(default_factory=list)


# --- leases ------------------------------------------------------------------------------
def begin_upload(io: BlobIO, *, wait: float = SWEEP_TTL + 5) -> str:
    """Write an upload lease, then wait while a live sweep runs; returns the lease key."""
    lease = f"{LEASES}{uuid.uuid4().hex}"
    io.blob_put(lease, b"")
    deadline = time.monotonic() + wait
    while True:
        sweeps, now = io.blob_list(SWEEPS)
        live = [k for k, _s, m in sweeps if now - m < SWEEP_TTL]
        if not live:
            return lease
        if time.monotonic() > deadline:
            io.blob_delete(lease)
            raise StorageError(
                f"gave up waiting for the blob sweep {live[0]} to finish", transient=True
            )
        time.sleep(0.05)


def end_upload(io: BlobIO, lease: str) -> None:
    """Remove the lease (a crashed upload's lease is ignored once older than LEASE_TTL)."""
    try:
        io.blob_delete(lease)
    except StorageError as exc:
        log.warning("could not remove the upload lease %s: %s", lease, exc)


class _Renewal:
    """Re-writes an upload lease every LEASE_RENEW seconds on a thread until stopped."""

    def __init__(self, io: BlobIO, lease: str) -> None:
        self.io, self.lease = io, lease
        self.renewed = time.monotonic()  # of the last write that succeeded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew {lease}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LEASE_RENEW):
            try:
                self.io.blob_put(self.lease, b"")
            except Exception as exc:  # on a thread: said here, and check() decides
                log.warning("could not renew the upload lease %s: %s", self.lease, exc)
            else:
                self.renewed = time.monotonic()

    def check(self) -> None:
        """StorageError (transient: the upload may be retried) if the lease went unrenewed
        for LEASE_STALE: a sweep may have deleted a pack this upload references."""
        unrenewed = time.monotonic() - self.renewed
        if unrenewed > LEASE_STALE:
            raise StorageError(
                f"the upload lease {self.lease} could not be renewed for {unrenewed:.0f} s "
                "(a blob sweep may have taken the upload for dead); nothing was published",
                transient=True,
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- upload ------------------------------------------------------------------------------
def known_blobs(io: BlobIO) -> dict[str, BlobLoc]:
    """Every blob the store holds, from the indexes of the packs that exist."""
    packs = {k[len(PACKS) :] for k, _s, _m in io.blob_list(PACKS)[0]}
    out: dict[str, BlobLoc] = {}
    for key, _s, _m in io.blob_list(INDEX)[0]:
        pack = key[len(INDEX) :]
        if pack not in packs:
            continue  # a pack being swept (index goes first) or never finished
        try:
            doc = json.loads(gzip.decompress(io.blob_get(key)))
            rows: dict[str, BlobLoc] = {}
            for digest, off, length, codec, size in doc["blobs"]:
                # untrusted like a manifest: a row naming no real location would make an
                # upload skip a blob no pack holds
                why = blob_problem(digest, pack, off, length, codec, size)
                if why is not None:
                    raise ValueError(f"the row for {str(digest)[:80]!r} {why}")
                rows.setdefault(digest, BlobLoc(pack, off, length, codec, size))
        except TargetNotFoundError:
            continue
        except _UNREADABLE_INDEX as exc:
            log.warning("ignoring the unreadable pack index %s: %s", key, exc)
            continue
        for digest, loc in rows.items():  # a whole index or none of it
            out.setdefault(digest, loc)
    return out


def store_tree(
    io: BlobIO,
    walk: TreeWalk,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[Manifest, UploadStats]:
    """Read each file of ``walk`` (``walk_tree``) once: hash it and, when the store lacks
    that content, append it to a new pack; returns the manifest with every file's blob
    location. The digest recorded is always the digest of the bytes stored (both come from
    the same read: a file changed meanwhile is stored as read, never under another file
    version's digest). The caller holds an upload lease (``begin_upload``) from before this
    call until the manifest is published: no sweep deletes a pack the manifest names."""
    known = known_blobs(io)
    stats = UploadStats()
    entries: list[Entry] = []
    done = 0
    with _PackWriter(io, known, stats) as packs:
        for e in walk.entries:
            if e[0] != "f":
                entries.append(e)
                continue
            f = packs.add(e[2], e[1])  # type: ignore[misc]
            entries.append(f)
            stats.files += 1
            done += f.size
            if progress is not None:
                progress(done)
    located = [_located(e, known) for e in entries]
    return Manifest(tree_digest(located), tuple(located)), stats


@contextlib.contextmanager
def tree_upload(
    io: BlobIO,
    src: Path,
    progress: Callable[[int, int], None] | None,
    target_id: str | None,
) -> Iterator[tuple[str, bytes]]:
    """Walk directory ``src``, send the blobs the store lacks, and give the caller the target
    id and the manifest's bytes to publish, all under an upload lease (held until the caller
    published, so no sweep deletes a pack the manifest is about to reference). A refused tree
    touches nothing in the store."""
    walk = walk_tree(src)
    lease = begin_upload(io)
    renewal: _Renewal | None = None
    try:
        renewal = _Renewal(io, lease)
        total = walk.file_bytes
        cb = (lambda done: progress(done, total)) if progress is not None else None
        m, _stats = store_tree(io, walk, progress=cb)
        renewal.check()
        yield target_id or content_id("tree", m.tree), encode_manifest(m)
    finally:
        if renewal is not None:
            renewal.stop()
        end_upload(io, lease)


def _located(e: Entry, known: dict[str, BlobLoc]) -> Entry:
    if not isinstance(e, FileEntry):
        return e
    loc = known[e.sha256]
    return replace(e, pack=loc.pack, offset=loc.offset, length=loc.length, codec=loc.codec)


class _PackWriter:
    """New blobs appended to a pack temp file, each pack PUT (with its index) once past
    ``PACK_MAX`` on a helper thread while the next one is written, the last one on exit.
    ``known`` (digest -> location) learns every blob sent. The temp file is flocked while
    written: the local store's prune removes it only once its writer died."""

    def __init__(self, io: BlobIO, known: dict[str, BlobLoc], stats: UploadStats) -> None:
        self.io, self.known, self.stats = io, known, stats
        self.tmp_dir: Path | None = getattr(io, "blob_tmp_dir", None)
        if self.tmp_dir is not None:
            os.makedirs(self.tmp_dir, exist_ok=True)
        self._out: BinaryIO | None = None
        self._name = ""
        self._hasher = hashlib.sha256()
        self._rows: list[tuple[str, int, int, str, int]] = []
        self._pending: dict[str, int] = {}  # digest -> row, for blobs of the open pack
        self._offset = 0
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="send pack")
        self._sent: list[Future[dict[str, BlobLoc]]] = []

    def __enter__(self) -> _PackWriter:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            if exc is None:
                self._rotate()
                for fut in self._sent:  # every pack and index stored before any manifest
                    self.known.update(fut.result())
        finally:
            self._sender.shutdown(wait=True)  # a failed upload stops here, sending no more
            if self._out is not None:
                self._discard(self._out, self._name)

    # --- one file ------------------------------------------------------------------
    def add(self, path: str, rel: str) -> FileEntry:
        """Read the file once; its entry (stored only if new: store and this upload)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise StorageError(f"{path} was removed while it was being uploaded") from exc
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StorageError(f"{path} became a symlink while it was being uploaded") from exc
        with os.fdopen(fd, "rb", buffering=0) as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{path} is no longer a regular file; upload it again")
            executable = bool(st.st_mode & 0o111)
            head, whole = _read_head(fh, st.st_size) if st.st_size <= _WHOLE_MAX else (b"", False)
            if whole:
                digest, size = hashlib.sha256(head).hexdigest(), len(head)
                if not self._have(digest):
                    self._append_whole(digest, head)
            else:  # large (or it grew past the limit while read)
                digest, size = self._append_streamed(fh, head)
        return FileEntry(rel, executable, size, digest)

    def _have(self, digest: str) -> bool:
        return digest in self.known or digest in self._pending

    def _open(self) -> BinaryIO:
        if self._out is None:
            fd, self._name = tempfile.mkstemp(prefix=".pack-", suffix=".tmp", dir=self.tmp_dir)
            self._out = os.fdopen(fd, "w+b")
            fcntl.flock(self._out.fileno(), fcntl.LOCK_EX)
            self._hasher, self._rows, self._pending, self._offset = hashlib.sha256(), [], {}, 0
        return self._out

    def _append_whole(self, digest: str, data: bytes) -> None:
        blob, codec = _encode(data)
        out = self._open()
        out.write(blob)
        self._hasher.update(blob)
        self._row(digest, len(blob), codec, len(data))

    def _append_streamed(self, fh: BinaryIO, head: bytes) -> tuple[str, int]:
        """A large file (``head``: what was read of it already) hashed and compressed in one
        read, chunk by chunk (memory bounded); cut back off the pack when the store already
        had it. Compressed when its first chunk shrinks by a tenth."""
        out = self._open()
        start, saved = self._offset, self._hasher.copy()
        h = hashlib.sha256()
        z: Any = None
        size = written = 0
        chunks = itertools.chain([head] if head else [], iter(lambda: fh.read(_CHUNK), b""))
        for chunk in chunks:
            h.update(chunk)
            if not size:
                z = isal_zlib.compressobj(_LEVEL)
                piece = z.compress(chunk) + z.flush(isal_zlib.Z_FULL_FLUSH)
                if len(piece) >= len(chunk) * 0.9:
                    z, piece = None, chunk
            else:
                piece = z.compress(chunk) if z is not None else chunk
            size += len(chunk)
            out.write(piece)
            self._hasher.update(piece)
            written += len(piece)
        if z is not None:
            tail = z.flush()
            out.write(tail)
            self._hasher.update(tail)
            written += len(tail)
        digest = h.hexdigest()
        if self._have(digest):  # a duplicate: written for nothing, cut off again
            out.seek(start)
            out.truncate()
            self._hasher = saved
        else:
            self._row(digest, written, "z" if z is not None else "raw", size)
        return digest, size

    def _row(self, digest: str, length: int, codec: str, size: int) -> None:
        self._pending[digest] = len(self._rows)
        self._rows.append((digest, self._offset, length, codec, size))
        self._offset += length
        if self._offset >= PACK_MAX:
            self._rotate()

    # --- packs ---------------------------------------------------------------------
    def _rotate(self) -> None:
        """Close the open pack and hand it to the sender thread."""
        out, name = self._out, self._name
        if out is None:
            return
        self._out = None
        for fut in self._sent:  # an earlier pack's failure ends the upload now
            failed = fut.exception() if fut.done() else None
            if failed is not None:
                self._discard(out, name)
                raise failed
        pack, rows = self._hasher.hexdigest(), self._rows
        self.stats.new_blobs += len(rows)
        self.stats.sent_bytes += self._offset
        self.stats.packs.append(pack)
        # Known as soon as it is queued: a later duplicate in this upload refers to it (the
        # manifest goes out only once every queued pack is stored).
        self.known.update({d: BlobLoc(pack, o, n, c, sz) for d, o, n, c, sz in rows})
        try:
            out.flush()
            if self.tmp_dir is not None:  # moved into place as the stored pack: make it durable
                os.fsync(out.fileno())
        except BaseException:
            self._discard(out, name)
            raise
        self._sent.append(self._sender.submit(_send_pack, self.io, out, name, pack, rows))

    @staticmethod
    def _discard(out: BinaryIO, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        out.close()


def _send_pack(
    io: BlobIO, out: BinaryIO, name: str, pack: str, rows: list[tuple[str, int, int, str, int]]
) -> dict[str, BlobLoc]:
    """PUT the written pack temp file ``name`` (still open and flocked as ``out``), then its
    index (after the pack: an index never names a pack that is not stored)."""
    try:
        io.blob_put(PACKS + pack, Path(name))  # the local store moves it into place
    finally:
        _PackWriter._discard(out, name)
    index = {"pack": pack, "blobs": rows}
    io.blob_put(INDEX + pack, igzip.compress(json.dumps(index).encode(), _LEVEL, mtime=0))
    return {d: BlobLoc(pack, off, n, c, s) for d, off, n, c, s in rows}


def _read_head(fh: BinaryIO, size_hint: int) -> tuple[bytes, bool]:
    """Up to ``_WHOLE_MAX + 1`` bytes of the file, and whether that was all of it (read to
    EOF: its size may have changed since ``size_hint`` was taken)."""
    parts: list[bytes] = []
    have, want = 0, min(size_hint, _WHOLE_MAX) + 1
    while have <= _WHOLE_MAX:
        chunk = fh.read(want - have if have < want else _CHUNK)
        if not chunk:
            return (parts[0] if len(parts) == 1 else b"".join(parts)), True
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts), False


def _encode(data: bytes) -> tuple[bytes, str]:
    """The blob of ``data``: zlib-compressed (isal level 1, as the classic tar.gz) when that
    saves a tenth, else raw."""
    if len(data) >= _COMPRESS_MIN:
        z = isal_zlib.compress(data, _LEVEL)
        if len(z) < len(data) * 0.9:
            return z, "z"
    return data, "raw"


# --- download ----------------------------------------------------------------------------
class BlobSink(Protocol):
    """Where fetched blobs go: ``begin`` a blob, ``write`` its bytes, then ``commit`` (its
    size and sha256 checked) or ``abort``."""

    def begin(self, digest: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def plan_ranges(files: Iterable[FileEntry]) -> list[tuple[str, int, int, list[FileEntry]]]:
    """(pack, start, end, blobs) ranged reads for the distinct blobs of ``files``: packs in
    the order ``files`` first uses them (a manifest's order, which its build follows: a
    blob then mostly arrives as the builder needs it, not after a whole other pack), blobs
    of a pack by offset."""
    by_pack: dict[str, dict[str, FileEntry]] = {}
    for f in files:
        by_pack.setdefault(f.pack, {}).setdefault(f.sha256, f)
    out: list[tuple[str, int, int, list[FileEntry]]] = []
    for pack, blobs in by_pack.items():
        cur: list[FileEntry] = []
        start = end = 0
        for f in sorted(blobs.values(), key=lambda b: b.offset):
            if cur and (f.offset - end > COALESCE_GAP or f.offset + f.length - start > RANGE_MAX):
                out.append((pack, start, end, cur))
                cur = []
            if not cur:
                start = f.offset
            cur.append(f)
            end = max(end, f.offset + f.length)
        if cur:
            out.append((pack, start, end, cur))
    return out


def fetch_blobs(io: BlobIO, files: Iterable[FileEntry], sink: BlobSink) -> int:
    """Fetch the blobs of ``files`` into ``sink``, each verified; returns bytes read.

    TargetNotFoundError when a pack is missing, IntegrityError when a blob's bytes do not
    match its size or sha256 (the sink's blob is aborted)."""
    total = 0
    for pack, start, end, blobs in plan_ranges(files):
        stream = _Reader(io.blob_stream(PACKS + pack, start, end), f"pack {pack}")
        pos = start
        for f in blobs:
            stream.skip(f.offset - pos)
            sink.begin(f.sha256)
            try:
                _decode_into(stream, f, sink)
            except BaseException:
                sink.abort()
                raise
            sink.commit()
            pos = f.offset + f.length
        total += end - start
    return total


class _Reader:
    """Exactly-n reads over an iterator of chunks: views into the current chunk (no copy), and
    a joined copy of only the n bytes of a read that spans chunks."""

    def __init__(self, chunks: Iterator[bytes], what: str) -> None:
        self._it = chunks
        self._view = memoryview(b"")
        self._pos = 0
        self.what = what

    def read(self, n: int) -> bytes | memoryview:
        """The next ``n`` bytes: a view into the chunk they are in (valid as long as the
        caller keeps it; copy what is kept beyond the blob), or a copy if they span chunks."""
        end = self._pos + n
        if end <= len(self._view):
            self._pos = end
            return self._view[end - n : end]
        parts: list[bytes | memoryview] = [self._view[self._pos :]]
        have = len(parts[0])
        while True:
            nxt = next(self._it, None)
            if nxt is None:
                raise IntegrityError(f"{self.what} ended before the blobs its index names")
            if have + len(nxt) >= n:
                self._view, self._pos = memoryview(nxt), n - have
                parts.append(self._view[: self._pos])
                return b"".join(parts)
            parts.append(nxt)
            have += len(nxt)

    def skip(self, n: int) -> None:
        while n > 0:
            n -= len(self.read(min(n, _CHUNK)))


def _decode_into(stream: _Reader, f: FileEntry, sink: BlobSink) -> None:
    """Read blob ``f`` off ``stream`` into ``sink``, checking its size and sha256. Inflated
    output is bounded per call (``_CHUNK`` * 4, and never past one byte more than the size
    the manifest claims): a small blob that inflates to gigabytes costs no memory."""
    h = hashlib.sha256()
    size = 0
    left = f.length
    d = isal_zlib.decompressobj() if f.codec == "z" else None
    try:
        while left and size <= f.size:
            raw = stream.read(min(left, _CHUNK))
            left -= len(raw)
            while size <= f.size:
                out = d.decompress(raw, min(f.size - size + 1, 4 * _CHUNK)) if d else bytes(raw)
                size += len(out)
                if size <= f.size:
                    h.update(out)
                    sink.write(out)
                raw = d.unconsumed_tail if d else b""
                if not raw:
                    break
        if d is not None and size <= f.size:
            tail = d.flush()
            size += len(tail)
            h.update(tail)
            sink.write(tail)
    except isal_zlib.error as exc:  # type: ignore[misc]
        raise IntegrityError(f"blob {f.sha256} of {f.path!r} is corrupt: {exc}") from exc
    if size != f.size or h.hexdigest() != f.sha256:
        raise IntegrityError(
            f"blob of {f.path!r} does not match its digest: expected {f.size} bytes with "
            f"sha256 {f.sha256}, got {size} bytes with sha256 {h.hexdigest()}"
        )


# --- sweep -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepResult:
    """What a blob sweep did (or, dry, would do): packs deleted as (key, bytes, modified),
    or why it did not run."""

    deleted: tuple[tuple[str, int, float], ...] = ()
    skipped: str = ""

    @property
    def freed_bytes(self) -> int:
        """Bytes of the packs deleted."""
        return sum(s for _k, s, _m in self.deleted)


def sweep_packs(
    io: BlobIO,
    live_manifests: Callable[[], Iterable[Manifest]],
    *,
    grace: float,
    dry_run: bool = False,
) -> SweepResult:
    """Delete packs no manifest references, older than ``grace`` seconds (see the module
    docstring for why a concurrent upload is never harmed)."""
    if not io.blob_list(PACKS)[0]:
        return SweepResult()  # nothing to sweep: write nothing (a store may not exist yet)
    marker = f"{SWEEPS}{uuid.uuid4().hex}"
    if not dry_run:
        io.blob_put(marker, b"")
    started = time.monotonic()
    try:
        leases, now = io.blob_list(LEASES)
        if any(now - m < LEASE_TTL for _k, _s, m in leases):
            return SweepResult(skipped="an upload is in progress")
        try:
            live = {f.pack for m in live_manifests() for f in m.files}
        except ForgespaceError as exc:  # a manifest we cannot read may reference any pack
            return SweepResult(skipped=f"a manifest could not be read: {exc}")
        packs, now = io.blob_list(PACKS)
        doomed = [p for p in packs if p[0][len(PACKS) :] not in live and now - p[2] >= grace]
        if dry_run:
            return SweepResult(tuple(doomed))
        deleted: list[tuple[str, int, float]] = []
        for item in doomed:
            if time.monotonic() - started > SWEEP_DEADLINE:
                return SweepResult(tuple(deleted), skipped="deadline reached; the rest kept")
            io.blob_delete(INDEX + item[0][len(PACKS) :])  # index first: no upload trusts it
            io.blob_delete(item[0])
            deleted.append(item)
        for key, _s, m in leases:
            if now - m >= LEASE_TTL:
                io.blob_delete(key)  # a crashed upload's
        return SweepResult(tuple(deleted))
    finally:
        if not dry_run:
            io.blob_delete(marker)


__all__ = [
    "BLOBS_PREFIX",
    "BlobIO",
    "BlobLoc",
    "BlobSink",
    "SweepResult",
    "UploadStats",
    "begin_upload",
    "end_upload",
    "fetch_blobs",
    "known_blobs",
    "plan_ranges",
    "store_tree",
    "sweep_packs",
]
