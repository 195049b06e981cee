# Over 500 lines on purpose: the only place botocore errors are translated (every call, retry,
# ranged resume, upload, lifecycle listing and result goes through S3Store._call).
"""The S3 / MinIO store: targets at ``s3://{S3_BUCKET}/{target_id}/target``.

This is the only module that sees botocore: every botocore/urllib3 error is translated
here (``raise ... from``) into TargetNotFoundError, IntegrityError or StorageError.

Choices worth knowing:

- Path-style addressing, so MinIO (and any endpoint without wildcard DNS) works.
- botocore's own retries are OFF (``total_max_attempts=1``): they would multiply with ours
  (6 x 3 attempts) and cannot resume a broken download. Every call goes through one
  policy, :class:`~forgespace.storage.retry.RetryPolicy`: exponential backoff with jitter
  on 5xx, throttling, connection resets, timeouts and short reads; never on 404.
- A download is one streamed GET, written to a temp file while hashed (1 MiB chunks:
  memory does not grow with the object). After a fault it resumes with
  ``Range: bytes=N-`` and ``If-Match: <etag>`` from the bytes already written; if the
  object changed meanwhile (412) it starts over. We do not use boto3's multipart download:
  ranged GETs are cheap on MinIO/S3 but moto re-reads the whole object per range, and one
  stream is already disk- or network-bound for targets of this size.
- forgespace records ``sha256`` in the object's user metadata (x-amz-meta-sha256); objects
  PUT by other clients have none and are verified by size only.
- Request checksums are only sent "when required": our own sha256 covers integrity and
  some S3-compatible servers reject the newer default trailing checksums.
- Buckets (targets, results) are created on first write when missing.
- Re-uploading content the bucket holds sends no object bytes but restarts its age for
  ``store prune`` (a self-copy with the same metadata). Prune and re-upload exclude each other
  through intent markers under ``.forgespace/prune/`` (see ``prune_target``): a plain
  check-then-DELETE cannot, since S3 offers no lock and a refresh keeps the ETag.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bexc
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from forgespace.config import Settings
from forgespace.errors import ConfigError, ForgespaceError, StorageError, TargetNotFoundError
from forgespace.layout import is_valid_id, validate_id
from forgespace.storage import blobs
from forgespace.storage.base import ObjectInfo, ProgressFn, target_key, upload_source
from forgespace.storage.lifecycle import StoredObject
from forgespace.storage.local import check_result_key
from forgespace.storage.manifest import (
    MANIFEST_MAGIC,
    FileEntry,
    Manifest,
    parse_manifest,
)
from forgespace.storage.pack import content_id, copy_hashing, pack_directory, tree_size
from forgespace.storage.retry import CHUNK_SIZE, DownloadTap, PartFile, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

SHA256_META = "sha256"
# copy_object copies at most 5 GiB in one request; larger objects are uploaded again instead.
COPY_OBJECT_MAX = 5 * 1024**3
# A prune writes "{prefix}{target_id}/{uuid}" before it re-checks and deletes a target, and
# removes it after; an upload that reuses the target waits while such a marker is live. Not a
# valid target id ('.'), so never listed as a target. Markers older than the TTL (by the
# server's clock) are a crashed prune's: ignored, and removed by the next prune.
PRUNE_MARKER_PREFIX = ".forgespace/prune/"
PRUNE_MARKER_TTL = 60.0
# A prune sends its DELETE only within this many seconds of writing its marker (else keeps
# the target): the DELETE lands long before uploads stop honouring the marker.
PRUNE_DELETE_DEADLINE = 20.0
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "RequestLimitExceeded",
    "TooManyRequests",
}


class _ShortRead(Exception):
    """The stream ended before the object's size: resume."""


# Errors of the connection or of the response stream: a retry (or resume) may succeed.
_TRANSIENT_EXC: tuple[type[Exception], ...] = (
    bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError...
    bexc.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    bexc.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
# What is translated at all: errors of botocore/boto3 and of the connection. Anything else
# (a local disk error, an exception from a progress callback) propagates untouched.
_BACKEND_ERRORS: tuple[type[Exception], ...] = (
    bexc.BotoCoreError,
    bexc.ClientError,
    S3UploadFailedError,
    *_TRANSIENT_EXC,
    _ShortRead,
)
_UPLOAD_CONFIG = TransferConfig(
    multipart_threshold=64 * 1024 * 1024,
    multipart_chunksize=16 * 1024 * 1024,
    max_concurrency=4,
)


def _code(exc: bexc.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


def _unwrap(exc: BaseException) -> BaseException:
    # boto3's upload_file hides the ClientError behind S3UploadFailedError (as __context__)
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, bexc.ClientError):
        return exc.__context__
    return exc


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, bexc.ClientError):
        code, status = _code(exc)
        return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
    return isinstance(exc, (*_TRANSIENT_EXC, _ShortRead))


def _is_not_found(exc: BaseException) -> bool:
    if isinstance(exc, bexc.ClientError):
        code, status = _code(exc)
        return code in _NOT_FOUND_CODES or status == 404
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, bexc.ClientError):
        code, status = _code(exc)
        msg = exc.response.get("Error", {}).get("Message", "")
        return f"HTTP {status} {code}{': ' + msg if msg else ''}"
    return f"{type(exc).__name__}: {exc}"


class S3Store:
    """Targets in an S3 bucket (MinIO, AWS S3, moto); see the module docstring."""

    display_name = "MinIO/S3"

    def __init__(
        self,
        client: Any,
        bucket: str,
        results_bucket: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.results_bucket = results_bucket
        self.endpoint = endpoint
        self.region = region
        self.retry = retry or RetryPolicy()
        self._ready_buckets: set[str] = set()
        self._bucket_lock = threading.Lock()
        #: Directories are stored as a manifest + shared blob packs (forgespace.storage.blobs);
        #: False stores them as one tar.gz (the classic layout).
        self.incremental = True

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        retry: RetryPolicy | None = None,
        read_timeout: float = 60.0,
    ) -> S3Store:
        """One boto3 client for this store object, configured from the S3_* settings.

        ``read_timeout``: seconds of silence on a connection before the read is abandoned
        (and retried/resumed)."""
        endpoint = settings.s3_endpoint
        if endpoint and "://" not in endpoint:
            endpoint = f"{'https' if settings.s3_use_ssl else 'http'}://{endpoint}"
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"invalid S3_ENDPOINT {settings.s3_endpoint!r}: expected an http:// or https:// "
                "URL (or host:port), e.g. http://127.0.0.1:9000"
            )
        config = Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=read_timeout,
            tcp_keepalive=True,
            max_pool_connections=16,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A private session: boto3's default session is shared (and not thread-safe).
        session = boto3.session.Session()
        try:
            client = session.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=settings.s3_access_key,
                aws_secret_access_key=settings.s3_secret_key,
                region_name=settings.s3_region,
                use_ssl=settings.s3_use_ssl,
                config=config,
            )
        except (ValueError, bexc.BotoCoreError) as exc:
            raise ConfigError(
                f"invalid S3 settings (S3_ENDPOINT={settings.s3_endpoint!r}, "
                f"S3_REGION={settings.s3_region!r}): {exc}; expected an endpoint like "
                "http://127.0.0.1:9000 and a region name like us-east-1"
            ) from exc
        store = cls(
            client,
            settings.s3_bucket,
            settings.s3_results_bucket,
            endpoint=endpoint,
            region=settings.s3_region,
            retry=retry,
        )
        store.incremental = settings.store_format == "manifest"
        return store

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def _where(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key} at {self.endpoint or 'AWS'}"

    # --- retries and translation ----------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, not_found: str | None = None) -> T:
        """Run ``fn`` under the retry policy; translate what finally escapes."""
        failures = 0
        while True:
            try:
                return fn()
            except ForgespaceError:
                raise
            except _BACKEND_ERRORS as exc:  # translated below, re-raised with `from`
                root = _unwrap(exc)
                if not_found is not None and _is_not_found(root):
                    raise TargetNotFoundError(not_found) from exc
                if not _is_transient(root):
                    raise StorageError(f"{what} failed: {_describe(root)}") from exc
                failures += 1
                if failures >= self.retry.attempts:
                    raise StorageError(
                        f"{what} failed after {failures} attempts: {_describe(root)}",
                        transient=True,
                    ) from exc
                delay = self.retry.delay(failures)
                log.warning("%s: %s; retrying in %.2fs", what, _describe(root), delay)
                time.sleep(delay)

    def _ensure_bucket(self, bucket: str) -> None:
        if bucket in self._ready_buckets:
            return
        with self._bucket_lock:
            if bucket in self._ready_buckets:
                return

            def create() -> None:
                try:
                    self.client.head_bucket(Bucket=bucket)
                    return
                except bexc.ClientError as exc:
                    if not _is_not_found(exc):
                        raise
                kwargs: dict[str, Any] = {"Bucket": bucket}
                if self.region and self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                try:
                    self.client.create_bucket(**kwargs)
                    log.info("created bucket %s at %s", bucket, self.endpoint or "AWS")
                except bexc.ClientError as exc:
                    # another client created it first: fine
                    if _code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

            self._call(f"creating bucket {bucket!r} at {self.endpoint or 'AWS'}", create)
            self._ready_buckets.add(bucket)

    # --- upload ---------------------------------------------------------------------
    def upload_target(
        self,
        path: str | Path,
        progress: ProgressFn | None = None,
        *,
        target_id: str | None = None,
    ) -> str:
        """Upload a file as-is, or a directory packed as a deterministic tar.gz; the sha256
        goes into the object's metadata.

        Returns the content id (``tree-…``/``file-…``; content the bucket already holds under
        it is not uploaded again: one HEAD, no object bytes), or ``target_id`` when given
        (used as given; an object already under it is replaced)."""
        src = upload_source(path)
        if target_id is not None:
            validate_id(target_id, "target_id")
        self._ensure_bucket(self.bucket)
        if src.is_file():
            size, digest = copy_hashing(src, None)
            tid = target_id or content_id("file", digest)
            if target_id is None and self._reuse(tid, size):
                return tid
            self._upload_file(src, target_key(tid), size, digest, progress)
            return tid
        if self.incremental:
            return self._upload_tree(src, progress, target_id)
        # pack to a temp file (never in RAM), then upload it
        fd, tmp_name = tempfile.mkstemp(prefix="forgespace-pack-", suffix=".tar.gz")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                total = tree_size(src) if progress is not None else 0
                cb = (lambda done: progress(done, total)) if progress is not None else None
                stats = pack_directory(src, out, progress=cb)
            tid = target_id or content_id("tree", stats.tree_digest)
            if target_id is None and self._reuse(tid, None):
                return tid
            self._upload_file(tmp, target_key(tid), stats.size, stats.sha256, progress)
        finally:
            tmp.unlink(missing_ok=True)
        return tid

    def _upload_tree(self, src: Path, progress: ProgressFn | None, target_id: str | None) -> str:
        """A directory as a manifest, sending only the blob packs the bucket lacks."""
        with blobs.tree_upload(self, src, progress, target_id) as (tid, data):
            if target_id is None and self._reuse(tid, None):
                return tid
            key = target_key(tid)
            self._call(
                f"PUT {self._where(key)}",
                lambda: self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    Metadata={SHA256_META: hashlib.sha256(data).hexdigest()},
                ),
            )
            return tid

    # --- blobs (forgespace.storage.blobs.BlobIO) ---------------------------------------
    def blob_put(self, key: str, src: Path | bytes) -> None:
        """PUT bytes, or upload a file (multipart when large), under ``key``."""
        if isinstance(src, bytes):
            self._call(
                f"PUT {self._where(key)}",
                lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=src),
            )
            return
        self._call(
            f"uploading {src} to {self._where(key)}",
            lambda: self.client.upload_file(str(src), self.bucket, key, Config=_UPLOAD_CONFIG),
        )

    def blob_get(self, key: str) -> bytes:
        """GET the whole object; TargetNotFoundError when absent."""
        where = self._where(key)

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call(f"GET {where}", get, not_found=f"{where} not found")

    def blob_stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of ``key`` by ranged GETs. A stream that breaks or ends early is
        resumed where it stopped, from the same object version (If-Match), up to the retry
        policy's attempts; then a transient StorageError (the cache's caller retries the whole
        get). A server answering with another range than asked is refused, never trusted."""
        where = self._where(key)

        def get(pos: int, etag: str | None) -> Any:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "Range": f"bytes={pos}-{end - 1}",
            }
            if etag:
                kwargs["IfMatch"] = etag
            resp = self._call(
                f"GET {where} bytes {pos}-{end - 1}",
                lambda: self.client.get_object(**kwargs),
                not_found=f"{where} not found",
            )
            got = str(resp.get("ContentRange") or "")
            if not got.startswith(f"bytes {pos}-"):
                resp["Body"].close()
                raise StorageError(
                    f"GET {where}: asked for bytes {pos}-{end - 1}, the server answered "
                    f"{repr(got) if got else 'the whole object'} (a server that ignores "
                    "Range cannot serve incremental targets)",
                    transient=True,
                )
            return resp

        first = get(start, None)  # a missing object fails here, before any byte is taken

        def chunks() -> Iterator[bytes]:
            resp, pos, failures = first, start, 0
            etag = first.get("ETag")
            while True:
                body = resp["Body"]
                try:
                    while pos < end and (chunk := body.read(min(CHUNK_SIZE, end - pos))):
                        pos += len(chunk)
                        yield chunk
                    if pos >= end:
                        return
                    fault: BaseException = _ShortRead(f"stream ended at byte {pos} of {end}")
                except _BACKEND_ERRORS as exc:  # resumed below, or re-raised with `from`
                    fault = exc
                finally:
                    body.close()
                failures += 1
                self._backoff(
                    fault, f"GET {where} bytes {start}-{end - 1}", failures, f"at byte {pos}"
                )
                resp = get(pos, etag)

        return chunks()

    def blob_list(self, prefix: str) -> tuple[list[tuple[str, int, float]], float]:
        """Objects under ``prefix`` with the server's clock (from the listing's Date)."""
        holder: list[float] = []

        def run() -> list[tuple[str, int, float]]:
            out: list[tuple[str, int, float]] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                holder.append(_server_time(page))
                out += [
                    (o["Key"], int(o["Size"]), o["LastModified"].timestamp())
                    for o in page.get("Contents", [])
                ]
            return out

        try:
            listing = self._call(f"LIST {self._where(prefix)}", run, not_found="no bucket")
        except TargetNotFoundError:
            return [], time.time()  # the bucket was never created: nothing stored yet
        return listing, holder[-1] if holder else time.time()

    def blob_delete(self, key: str) -> None:
        """DELETE the object; missing is fine."""
        self._call(
            f"DELETE {self._where(key)}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
        )

    def fetch_blobs(self, files: Iterable[FileEntry], sink: blobs.BlobSink) -> int:
        """Verified blobs of ``files`` into ``sink`` (forgespace.storage.blobs.fetch_blobs)."""
        return blobs.fetch_blobs(self, files, sink)

    def sweep_blobs(self, grace: float, *, dry_run: bool = False) -> blobs.SweepResult:
        """Delete packs no stored manifest references (forgespace.storage.blobs)."""
        return blobs.sweep_packs(self, self._manifests, grace=grace, dry_run=dry_run)

    def _manifests(self) -> Iterator[Manifest]:
        magic = len(MANIFEST_MAGIC)
        for obj in self.list_targets():
            key = target_key(obj.key)
            if obj.size < magic:
                continue  # too short to be a manifest
            try:
                if b"".join(self.blob_stream(key, 0, magic)) == MANIFEST_MAGIC:
                    yield parse_manifest(self.blob_get(key), f"target {obj.key}")
            except TargetNotFoundError:
                continue  # deleted meanwhile: no longer live

    def _stored(self, target_id: str, size: int | None) -> ObjectInfo | None:
        """The bucket's object for this content id (of ``size`` bytes, when known: a
        directory packed by another compressor version has other bytes, same content)."""
        try:
            info = self.stat_target(target_id)
        except TargetNotFoundError:
            return None
        return info if size is None or info.size == size else None

    def _reuse(self, target_id: str, size: int | None) -> bool:
        """Whether the content is already stored and may be used as it is: its age is
        restarted (a self-copy, so prune counts from this upload), no object bytes are sent.

        False (the caller uploads) when it is absent, changed, too large for a self-copy, or
        pruned while we looked: after the refresh we wait for any prune that had already
        re-checked the object (its intent marker, see ``prune_target``) and look again."""
        info = self._stored(target_id, size)
        if info is None or info.size > COPY_OBJECT_MAX:
            return False
        key = target_key(target_id)

        def refresh() -> bool:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "CopySource": {"Bucket": self.bucket, "Key": key},
                "MetadataDirective": "REPLACE",
                "Metadata": {SHA256_META: info.sha256} if info.sha256 else {},
            }
            if info.etag:
                kwargs["CopySourceIfMatch"] = info.etag
            try:
                self.client.copy_object(**kwargs)
            except bexc.ClientError as exc:
                if _is_not_found(exc) or _code(exc)[1] == 412:
                    return False  # deleted or replaced meanwhile: upload ours
                raise
            return True

        if not self._call(f"refreshing {self._where(key)}", refresh):
            return False
        self._await_prunes(target_id)
        return self._stored(target_id, size) is not None

    def _await_prunes(self, target_id: str) -> None:
        """Wait (bounded) until no live prune intent marker names ``target_id``."""
        prefix = f"{PRUNE_MARKER_PREFIX}{target_id}/"
        deadline = time.monotonic() + PRUNE_MARKER_TTL + 5
        while True:
            resp = self._call(
                f"LIST {self._where(prefix)}",
                lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix),
            )
            now = _server_time(resp)
            live = [
                o
                for o in resp.get("Contents", [])
                if now - o["LastModified"].timestamp() < PRUNE_MARKER_TTL
            ]
            if not live:
                return
            if time.monotonic() > deadline:
                raise StorageError(
                    f"gave up waiting for a prune of {target_id} to finish: its marker "
                    f"{self._where(live[0]['Key'])} is still there",
                    transient=True,
                )
            time.sleep(0.05)

    def _upload_file(
        self, src: Path, key: str, size: int, digest: str, progress: ProgressFn | None
    ) -> None:
        lock = threading.Lock()

        def put() -> None:
            done = 0

            def cb(n: int) -> None:
                # called from s3transfer's worker threads, one per part in flight
                nonlocal done
                with lock:
                    done += n
                    if progress is not None:
                        progress(done, size)

            self.client.upload_file(
                str(src),
                self.bucket,
                key,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Callback=cb,
                Config=_UPLOAD_CONFIG,
            )

        self._call(f"uploading {src} to {self._where(key)}", put)

    # --- read -----------------------------------------------------------------------
    def _not_found(self, target_id: str) -> str:
        where = self._where(target_key(target_id))
        return f"target {target_id} not found in {self.display_name} ({where})"

    def stat_target(self, target_id: str) -> ObjectInfo:
        """HEAD the object: size, recorded sha256 (None for foreign objects), etag."""
        key = target_key(validate_id(target_id))
        resp = self._call(
            f"HEAD {self._where(key)}",
            lambda: self.client.head_object(Bucket=self.bucket, Key=key),
            not_found=self._not_found(target_id),
        )
        return _info(resp, int(resp["ContentLength"]))

    def download_target(
        self,
        target_id: str,
        dest: str | Path,
        progress: ProgressFn | None = None,
        *,
        tap: DownloadTap | None = None,
    ) -> ObjectInfo:
        """One streamed GET into ``dest`` via a temp file, verified, resumed on faults."""
        key = target_key(validate_id(target_id))
        where = self._where(key)
        with PartFile(dest, tap) as part:
            expected: ObjectInfo | None = None
            failures = 0
            while True:
                if expected is not None and part.size == expected.size:
                    break  # everything arrived; the fault came after the last byte
                try:
                    resp = self._get(key, part, expected)
                    if expected is None:
                        expected = _info(resp, int(resp["ContentLength"]))
                    elif resp["ResponseMetadata"]["HTTPStatusCode"] != 206:
                        part.restart()  # the server ignored our Range: this is the whole object
                    self._drain(resp["Body"], part, expected, progress)
                    if part.size < expected.size:
                        raise _ShortRead(f"stream ended at {part.size} of {expected.size} bytes")
                    break
                except ForgespaceError:
                    raise
                except _BACKEND_ERRORS as exc:  # translated below, re-raised with `from`
                    failures += 1
                    if self._get_failed(exc, target_id, where, part, failures):
                        expected = None  # the object changed: start over
            assert expected is not None
            return part.commit(expected, f"target {target_id} ({where})")

    def _get_failed(
        self, exc: Exception, target_id: str, where: str, part: PartFile, failures: int
    ) -> bool:
        """Decide about a failed GET: raise when it is final; else wait (a transient fault:
        resume where it stopped) or restart the file (the object was replaced between
        attempts: True). Both are bounded by the retry policy's attempts."""
        if _is_not_found(exc):
            raise TargetNotFoundError(self._not_found(target_id)) from exc
        if isinstance(exc, bexc.ClientError) and _code(exc)[1] in (412, 416):
            if failures >= self.retry.attempts:
                raise StorageError(
                    f"GET {where}: the object kept changing during the download",
                    transient=True,
                ) from exc
            log.warning("%s changed during download; restarting", where)
            part.restart()
            return True
        self._backoff(exc, f"GET {where}", failures, f"{part.size} bytes received")
        return False

    def _backoff(self, exc: BaseException, what: str, failures: int, at: str) -> None:
        """After the ``failures``-th fault of a read (``at``: how far it got): raise a
        StorageError when the fault is final (transient when attempts ran out), else wait the
        retry policy's delay before the caller resumes."""
        if not _is_transient(exc):
            raise StorageError(f"{what} failed: {_describe(exc)}") from exc
        if failures >= self.retry.attempts:
            raise StorageError(
                f"{what} failed after {failures} attempts ({at}): {_describe(exc)}",
                transient=True,
            ) from exc
        delay = self.retry.delay(failures)
        log.warning("%s: %s (%s); resuming in %.2fs", what, _describe(exc), at, delay)
        time.sleep(delay)

    def _get(self, key: str, part: PartFile, expected: ObjectInfo | None) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if expected is not None and part.size:
            # resume where the broken stream stopped, but only from the same object version
            kwargs["Range"] = f"bytes={part.size}-"
            if expected.etag:
                kwargs["IfMatch"] = expected.etag
        return self.client.get_object(**kwargs)

    @staticmethod
    def _drain(
        body: Any, part: PartFile, expected: ObjectInfo, progress: ProgressFn | None
    ) -> None:
        try:
            while chunk := body.read(CHUNK_SIZE):
                part.write(chunk)
                if part.size > expected.size:
                    return  # commit reports the size mismatch
                if progress is not None:
                    progress(part.size, expected.size)
        finally:
            body.close()

    # --- delete / results -----------------------------------------------------------
    def delete_target(self, target_id: str) -> None:
        """Delete the object; missing object or bucket is not an error."""
        key = target_key(validate_id(target_id))

        def delete() -> None:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except bexc.ClientError as exc:
                if not _is_not_found(exc):
                    raise

        self._call(f"DELETE {self._where(key)}", delete)

    def put_result(self, key: str, data: bytes, content_type: str = "application/json") -> str:
        """PUT ``data`` into the results bucket; returns ``s3://bucket/key``."""
        norm = check_result_key(key)
        self._ensure_bucket(self.results_bucket)
        self._call(
            f"PUT {self._where(norm, self.results_bucket)}",
            lambda: self.client.put_object(
                Bucket=self.results_bucket, Key=norm, Body=data, ContentType=content_type
            ),
        )
        return f"s3://{self.results_bucket}/{norm}"

    def result_keys(self, prefix: str) -> list[str]:
        """Keys of the results bucket starting with ``prefix``, not below its next ``/``."""

        def list_keys() -> list[str]:
            keys: list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.results_bucket, Prefix=prefix, Delimiter="/"
            )
            try:
                for page in pages:
                    keys += [o["Key"] for o in page.get("Contents", [])]
            except bexc.ClientError as exc:
                if not _is_not_found(exc):  # no bucket yet: nothing stored
                    raise
            return sorted(keys)

        return self._call(f"LIST {self._where(prefix + '*', self.results_bucket)}", list_keys)

    def get_result(self, key: str) -> bytes:
        """GET a result object; FileNotFoundError (TargetNotFoundError) when it is absent."""
        norm = check_result_key(key)
        where = self._where(norm, self.results_bucket)

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.results_bucket, Key=norm)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call(f"GET {where}", get, not_found=f"no result {where}")

    # --- lifecycle (forgespace store ls / rm / prune) ----------------------------------
    def _list(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        """Every object of ``bucket`` under ``prefix`` (paginated); [] when no bucket."""

        def run() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            ):
                out.extend(page.get("Contents", []))
            return out

        try:
            return self._call(f"LIST s3://{bucket}/{prefix}", run, not_found="no bucket")
        except TargetNotFoundError:
            return []  # the bucket was never created: nothing stored yet

    def list_targets(self) -> list[StoredObject]:
        """Every ``{id}/target`` object (valid ids only); ``modified`` = LastModified, which a
        re-upload restarts. ``sha256`` is None (a listing does not carry metadata)."""
        out: list[StoredObject] = []
        for o in self._list(self.bucket):
            tid, _, rest = o["Key"].partition("/")
            if rest == "target" and is_valid_id(tid):
                out.append(
                    StoredObject("target", tid, int(o["Size"]), o["LastModified"].timestamp())
                )
        return sorted(out, key=lambda x: x.key)

    def list_results(self) -> list[StoredObject]:
        """Every object of the results bucket."""
        return sorted(
            (
                StoredObject("result", o["Key"], int(o["Size"]), o["LastModified"].timestamp())
                for o in self._list(self.results_bucket)
            ),
            key=lambda x: x.key,
        )

    def list_leftovers(self, grace: float, now: float | None = None) -> list[StoredObject]:
        """Intent markers of prunes that died (older than the marker TTL and ``grace``)."""
        now = time.time() if now is None else now
        limit = max(grace, PRUNE_MARKER_TTL)
        return sorted(
            (
                StoredObject("leftover", o["Key"], int(o["Size"]), o["LastModified"].timestamp())
                for o in self._list(self.bucket, PRUNE_MARKER_PREFIX)
                if now - o["LastModified"].timestamp() >= limit
            ),
            key=lambda x: x.key,
        )

    def prune_target(self, target_id: str, cutoff: float) -> bool:
        """Delete the target if its LastModified is still before ``cutoff``.

        An intent marker is written first and removed after: an upload that reuses this
        object refreshes it, then waits while a marker is live and looks again (uploading
        anew if we deleted it). So either our HEAD sees the refresh and we keep the object,
        or the upload sees our marker (or the deletion) after its refresh."""
        key = target_key(validate_id(target_id))
        marker = f"{PRUNE_MARKER_PREFIX}{target_id}/{uuid.uuid4().hex}"
        self._call(
            f"PUT {self._where(marker)}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=marker, Body=b""),
        )
        started = time.monotonic()
        try:
            try:
                head = self._call(
                    f"HEAD {self._where(key)}",
                    lambda: self.client.head_object(Bucket=self.bucket, Key=key),
                    not_found=self._not_found(target_id),
                )
            except TargetNotFoundError:
                return False
            if head["LastModified"].timestamp() >= cutoff:
                return False  # uploaded again since the plan: still wanted
            if time.monotonic() - started > PRUNE_DELETE_DEADLINE:
                log.warning("prune of %s kept it: too slow to delete safely", target_id)
                return False
            self.delete_target(target_id)
            return True
        finally:
            try:
                self._call(
                    f"DELETE {self._where(marker)}",
                    lambda: self.client.delete_object(Bucket=self.bucket, Key=marker),
                )
            except StorageError as exc:
                # re-uploads of this id wait until the marker expires (PRUNE_MARKER_TTL)
                log.warning("could not remove the prune marker %s: %s", marker, exc)

    def prune_result(self, key: str, cutoff: float) -> bool:
        """Delete the result if its LastModified is still before ``cutoff``."""
        norm = check_result_key(key)
        where = self._where(norm, self.results_bucket)
        try:
            head = self._call(
                f"HEAD {where}",
                lambda: self.client.head_object(Bucket=self.results_bucket, Key=norm),
                not_found=f"result {norm} not found ({where})",
            )
        except TargetNotFoundError:
            return False
        if head["LastModified"].timestamp() >= cutoff:
            return False
        self._call(
            f"DELETE {where}",
            lambda: self.client.delete_object(Bucket=self.results_bucket, Key=norm),
        )
        return True

    def remove_leftover(self, obj: StoredObject, grace: float) -> bool:
        """Remove a dead prune marker named by ``list_leftovers``."""
        if obj.kind != "leftover" or not obj.key.startswith(PRUNE_MARKER_PREFIX):
            raise ValueError(f"not a leftover of {self}: {obj.key!r}")
        self._call(
            f"DELETE {self._where(obj.key)}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=obj.key),
        )
        return True


def _server_time(resp: dict[str, Any]) -> float:
    """The server's clock from a response's Date header (markers are aged by it, so client
    clock skew does not matter); the local clock when absent."""
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date).timestamp()
    return time.time()


def _info(resp: dict[str, Any], size: int) -> ObjectInfo:
    meta = resp.get("Metadata") or {}
    sha = meta.get(SHA256_META)
    return ObjectInfo(size=size, sha256=sha or None, etag=resp.get("ETag"))
