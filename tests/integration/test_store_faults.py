"""S3 downloads under faults (injected by the proxy in front of moto), bounded memory, and
the proxy's own guarantees that other parts' tests rely on (counting across processes)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from support.objects import s3_client
from support.s3server import S3Server, env_for

from forgespace.config import Settings
from forgespace.errors import ConfigError, StorageError, TargetNotFoundError
from forgespace.storage import target_key
from forgespace.storage.retry import RetryPolicy
from forgespace.storage.s3 import S3Store

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)


@pytest.fixture
def store(s3_settings: Settings) -> S3Store:
    return S3Store.from_settings(s3_settings, retry=FAST)


def _upload(store: S3Store, tmp_path: Path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    src = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    src.write_bytes(data)
    return store.upload_target(src), data


def test_missing_key_raises_at_once_with_one_get(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    _upload(store, tmp_path, 10)  # the bucket exists; only the key is missing
    tid = str(uuid.uuid4())
    key = target_key(tid)
    # A first backoff would sleep 120 s: returning well before that proves none happened,
    # however slow the machine is.
    slow = S3Store.from_settings(store_settings(store, s3_server), retry=RetryPolicy(base=120.0))
    started = time.monotonic()
    with pytest.raises(TargetNotFoundError, match=tid):
        slow.download_target(tid, tmp_path / "dest")
    assert time.monotonic() - started < 60  # no backoff sleep happened
    assert s3_server.get_count(key) == 1
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def store_settings(store: S3Store, server: S3Server) -> Settings:
    return Settings.from_env(
        {
            "STORAGE_BACKEND": "s3",
            "S3_ENDPOINT": server.endpoint,
            "S3_ACCESS_KEY": server.access_key,
            "S3_SECRET_KEY": server.secret_key,
            "S3_BUCKET": store.bucket,
            "S3_RESULTS_BUCKET": store.results_bucket,
        }
    )


def test_missing_bucket_is_target_not_found(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    store = S3Store.from_settings(
        s3_settings.with_(s3_bucket="never-created-" + uuid.uuid4().hex[:8])
    )
    tid = str(uuid.uuid4())
    with pytest.raises(TargetNotFoundError):
        store.download_target(tid, tmp_path / "dest")
    with pytest.raises(TargetNotFoundError):
        store.stat_target(tid)
    assert s3_server.get_count(target_key(tid)) == 1


def test_500s_are_retried(store: S3Store, s3_server: S3Server, tmp_path: Path) -> None:
    tid, data = _upload(store, tmp_path, 2 * 1024 * 1024)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("500", key=key, times=2)
    store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data
    assert s3_server.get_count(key) == 3
    assert s3_server.pending_faults() == 0


@pytest.mark.parametrize("fault", ["reset", "short"])
def test_broken_body_is_resumed(
    store: S3Store, s3_server: S3Server, tmp_path: Path, fault: str
) -> None:
    size, cut = 6 * 1024 * 1024, 2 * 1024 * 1024 + 512 * 1024
    tid, data = _upload(store, tmp_path, size)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject(fault, key=key, after_bytes=cut)  # type: ignore[arg-type]
    info = store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert s3_server.get_count(key) == 2
    if fault == "short":
        # the second GET asked only for the missing tail (Range), not the whole object again
        assert s3_server.bytes_served(key) < size + cut


def test_two_resets_in_a_row_still_succeed(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    tid, data = _upload(store, tmp_path, 4 * 1024 * 1024)
    s3_server.inject("reset", key=target_key(tid), times=2, after_bytes=1024 * 1024)
    store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data


def test_persistent_500s_give_a_transient_storage_error(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    tid, _ = _upload(store, tmp_path, 1000)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("500", key=key, times=100)
    with pytest.raises(StorageError, match="after 4 attempts") as err:
        store.download_target(tid, tmp_path / "dest")
    assert err.value.transient is True
    assert s3_server.get_count(key) == FAST.attempts
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        p.name for p in tmp_path.iterdir() if p.name.startswith("src-")
    ]


def test_upload_is_retried_after_a_500(store: S3Store, s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.inject("500", method="PUT", times=1)
    tid, data = _upload(store, tmp_path, 300_000)
    assert s3_server.request_count("PUT", target_key(tid)) == 2
    assert store.stat_target(tid).size == len(data)


def test_unreachable_endpoint_is_a_transient_storage_error(
    s3_settings: Settings, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    store = S3Store.from_settings(
        s3_settings.with_(s3_endpoint=f"http://127.0.0.1:{port}"), retry=FAST
    )
    with pytest.raises(StorageError) as err:
        store.download_target(str(uuid.uuid4()), tmp_path / "dest")
    assert err.value.transient is True
    assert not (tmp_path / "dest").exists()


# --- the proxy's guarantees -------------------------------------------------------------

_GETTER = textwrap.dedent(
    """
    import sys, boto3
    from botocore.config import Config
    endpoint, ak, sk, bucket, key, n = sys.argv[1:]
    c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak,
                     aws_secret_access_key=sk, region_name="us-east-1",
                     config=Config(s3={"addressing_style": "path"}))
    for _ in range(int(n)):
        assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b"payload"
    """
)


def test_proxy_counts_gets_from_concurrent_processes_and_threads(
    s3_settings: Settings, s3_server: S3Server
) -> None:
    client = s3_client(s3_settings)
    bucket, key = s3_settings.s3_bucket, f"{uuid.uuid4()}/target"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=b"payload")
    s3_server.reset_counts()
    args = [s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket, key, "5"]
    procs = [
        subprocess.Popen([sys.executable, "-c", _GETTER, *args], env=env_for(s3_settings))
        for _ in range(3)
    ]

    def get_in_thread() -> None:
        for _ in range(5):
            client.get_object(Bucket=bucket, Key=key)["Body"].read()

    threads = [threading.Thread(target=get_in_thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert s3_server.get_count(key) == 35
    assert s3_server.get_count(f"{bucket}/{key}") == 35
    assert s3_server.request_count("PUT", key) == 0  # counts were reset after the PUT


# --- bounded memory -----------------------------------------------------------------------

_DOWNLOADER = textwrap.dedent(
    """
    import resource, sys
    from forgespace.config import Settings
    from forgespace.storage import open_store
    store = open_store(Settings.from_env())
    store.stat_target(sys.argv[1])  # warm up client and connection pool first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = store.download_target(sys.argv[1], sys.argv[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, after, info.size)
    """
)


@pytest.mark.slow
def test_200mb_download_runs_in_bounded_memory(s3_settings: Settings, tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    src = tmp_path / "big.bin"
    block = os.urandom(1024 * 1024)
    with open(src, "wb") as f:
        for i in range(200):
            f.write(i.to_bytes(4, "big") + block[4:])
    store = S3Store.from_settings(s3_settings)
    tid = store.upload_target(src)
    src.unlink()
    dest = tmp_path / "dest"
    out = subprocess.run(
        [sys.executable, "-c", _DOWNLOADER, tid, str(dest)],
        env=env_for(s3_settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    store.delete_target(tid)  # moto keeps objects in RAM
    before_kb, after_kb, got = (int(x) for x in out)
    assert got == size and dest.stat().st_size == size
    assert (after_kb - before_kb) * 1024 < 100 * 1024 * 1024, (before_kb, after_kb)


def test_object_replaced_during_a_resumed_download_restarts(
    store: S3Store, s3_server: S3Server, s3_settings: Settings, tmp_path: Path
) -> None:
    tid, _ = _upload(store, tmp_path, 3 * 1024 * 1024)
    key = target_key(tid)
    new = os.urandom(2 * 1024 * 1024 + 99)
    client = s3_client(s3_settings)
    replaced = False

    def replace_once(done: int, total: int) -> None:
        nonlocal replaced
        if not replaced:  # another client overwrites the object mid-download
            replaced = True
            client.put_object(Bucket=s3_settings.s3_bucket, Key=key, Body=new)

    s3_server.inject("short", key=key, after_bytes=1024 * 1024)
    info = store.download_target(tid, tmp_path / "dest", progress=replace_once)
    # the resume asked If-Match the old version, got 412, and started over on the new one
    assert (tmp_path / "dest").read_bytes() == new
    assert info.size == len(new)
    assert s3_server.get_count(key) == 3


def test_settings_env_round_trips_every_setting(s3_settings: Settings) -> None:
    custom = s3_settings.with_(
        cache_max_size=1234567,
        cache_ttl=90.5,
        cache_lease_ttl=7200.0,
        cow_backend="overlay",
        s3_use_ssl=True,
        temporal_address="127.0.0.1:7233",
    )
    env = env_for(custom, base={"PATH": "/usr/bin", "S3_ENDPOINT": "stale"})
    assert Settings.from_env(env) == custom
    assert env["PATH"] == "/usr/bin"


@pytest.mark.parametrize("endpoint", ["ftp://host", "http://bad host:9000", "http://[::1"])
def test_invalid_endpoint_is_a_config_error(s3_settings: Settings, endpoint: str) -> None:
    with pytest.raises(ConfigError, match="S3_ENDPOINT"):
        S3Store.from_settings(s3_settings.with_(s3_endpoint=endpoint))


def test_bare_host_port_endpoint_works(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    bare = s3_server.endpoint.removeprefix("http://")
    store = S3Store.from_settings(s3_settings.with_(s3_endpoint=bare))
    tid, data = _upload(store, tmp_path, 1000)
    store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data


def test_proxy_relays_chunked_uploads_and_keeps_connections_alive(
    s3_settings: Settings, s3_server: S3Server
) -> None:
    import http.client

    client = s3_client(s3_settings)
    bucket = s3_settings.s3_bucket
    client.create_bucket(Bucket=bucket)
    host, port = s3_server.endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    parts = [b"hello ", b"chunked ", b"world"]
    conn.request("PUT", f"/{bucket}/c/target", body=iter(parts), encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    sock = conn.sock
    for method in ("HEAD", "GET", "HEAD"):  # unsigned: moto answers 403, with or without body
        conn.request(method, f"/{bucket}/c/target")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 403
    assert conn.sock is sock  # all on one kept-alive connection
    assert client.get_object(Bucket=bucket, Key="c/target")["Body"].read() == b"".join(parts)


def test_a_stalled_stream_times_out_and_resumes(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    store = S3Store.from_settings(s3_settings, retry=FAST, read_timeout=0.5)
    tid, data = _upload(store, tmp_path, 3 * 1024 * 1024)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("stall", key=key, after_bytes=1024 * 1024, stall=3.0)
    started = time.monotonic()
    store.download_target(tid, tmp_path / "dest")
    assert time.monotonic() - started < 2.5  # gave up on the silent stream, did not wait it out
    assert (tmp_path / "dest").read_bytes() == data
    assert s3_server.get_count(key) == 2


# --- what is not retried, and what servers do that they should not --------------------------


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_a_403_is_not_retried(
    store: S3Store, s3_server: S3Server, tmp_path: Path, code: str
) -> None:
    """Bad credentials or a missing permission do not heal by waiting: one request, then an
    error that names the status and the S3 code and is not transient."""
    tid, _ = _upload(store, tmp_path, 1000)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("error", key=key, times=10, status=403, code=code)
    with pytest.raises(StorageError, match=f"HTTP 403 {code}") as err:
        store.download_target(tid, tmp_path / "dest")
    assert err.value.transient is False
    assert s3_server.get_count(key) == 1
    s3_server.clear_faults()
    s3_server.inject("error", method="HEAD", key=key, times=10, status=403, code=code)
    with pytest.raises(StorageError, match="HTTP 403") as err:  # a HEAD answer has no body
        store.stat_target(tid)
    assert err.value.transient is False
    assert s3_server.request_count("HEAD", key) == 1


def test_a_403_on_upload_is_not_retried(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    _upload(store, tmp_path, 10)  # the bucket exists
    src = tmp_path / "up"
    src.write_bytes(b"x" * 1000)
    s3_server.reset_counts()
    s3_server.inject("error", method="PUT", key="up-id/target", times=10, status=403,
                     code="AccessDenied")  # fmt: skip
    with pytest.raises(StorageError, match="HTTP 403 AccessDenied") as err:
        store.upload_target(src, target_id="up-id")
    assert err.value.transient is False
    assert s3_server.request_count("PUT", "up-id/target") == 1


def test_a_bucket_created_by_another_client_meanwhile_is_used(
    store: S3Store, s3_server: S3Server, s3_settings: Settings
) -> None:
    """Two workers auto-create the results bucket at once: the one that loses the race gets
    BucketAlreadyOwnedByYou and goes on (here: the HEAD says 404, then the create says the
    bucket exists)."""
    bucket = store.results_bucket
    s3_client(s3_settings).create_bucket(Bucket=bucket)
    s3_server.inject("error", method="HEAD", key=f"{bucket}/", status=404, code="NoSuchBucket")
    s3_server.inject(
        "error", method="PUT", key=f"{bucket}/", status=409, code="BucketAlreadyOwnedByYou"
    )
    assert store.put_result("r/out.json", b"{}") == f"s3://{bucket}/r/out.json"
    assert s3_server.pending_faults() == 0
    got = s3_client(s3_settings).get_object(Bucket=bucket, Key="r/out.json")["Body"].read()
    assert got == b"{}"


def test_a_server_ignoring_range_sends_the_whole_object_again(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    size, cut = 3 * 1024 * 1024, 1024 * 1024
    tid, data = _upload(store, tmp_path, size)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("short", key=key, after_bytes=cut)
    s3_server.inject("ignore-range", key=key)  # the resume's Range is not honoured: 200
    info = store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data  # not the head twice
    assert info.size == size
    assert s3_server.get_count(key) == 2
    assert s3_server.bytes_served(key) == cut + size


def test_an_object_that_keeps_changing_gives_up_bounded(
    store: S3Store, s3_server: S3Server, s3_settings: Settings, tmp_path: Path
) -> None:
    tid, _ = _upload(store, tmp_path, 2 * 1024 * 1024)
    key = target_key(tid)
    client = s3_client(s3_settings)
    versions = 0

    def replace(done: int, total: int) -> None:
        nonlocal versions  # every attempt sees another version of the object
        versions += 1
        client.put_object(Bucket=s3_settings.s3_bucket, Key=key, Body=os.urandom(1024 * 1024 + 7))

    s3_server.reset_counts()
    s3_server.inject("short", key=key, after_bytes=64 * 1024, times=100)
    with pytest.raises(StorageError, match="kept changing during the download") as err:
        store.download_target(tid, tmp_path / "dest", progress=replace)
    assert err.value.transient is True
    # GETs cut short and resumes refused with 412 alternate; both count against one bound
    assert s3_server.get_count(key) == FAST.attempts
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_a_clean_stream_shorter_than_the_object_is_resumed_from_where_it_ended(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    # The first GET is cut (a short read the HTTP layer reports); the resume is answered with
    # a well-formed 206 that ends early without any error: only the size check notices.
    size, cut, capped = 3 * 1024 * 1024, 1024 * 1024, 512 * 1024
    tid, data = _upload(store, tmp_path, size)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("short", key=key, after_bytes=cut)
    s3_server.inject("partial-range", key=key, after_bytes=capped)
    info = store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data
    assert info.size == size
    # cut, then the capped range, then the rest: nothing fetched twice
    assert s3_server.get_count(key) == 3
    assert s3_server.bytes_served(key) == size
    assert s3_server.pending_faults() == 0


def test_streams_that_keep_ending_early_give_up_bounded(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    tid, _ = _upload(store, tmp_path, 2 * 1024 * 1024)
    key = target_key(tid)
    s3_server.reset_counts()
    s3_server.inject("short", key=key, after_bytes=64 * 1024)
    s3_server.inject("partial-range", key=key, after_bytes=1024, times=100)
    bounded = r"failed after 4 attempts \(\d+ bytes received\)"
    with pytest.raises(StorageError, match=bounded) as err:
        store.download_target(tid, tmp_path / "dest")
    assert err.value.transient is True
    assert "stream ended at" in str(err.value)
    assert s3_server.get_count(key) == FAST.attempts
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


# --- ranged reads of blob packs (incremental targets) -------------------------------------
def _pack_of_a_tree(store: S3Store, tmp_path: Path) -> tuple[str, str, bytes]:
    """Upload a directory as a manifest + one pack; (target id, pack key, the pack's bytes)."""
    from forgespace.storage import blobs

    src = tmp_path / f"tree-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    for i in range(4):  # random bytes: stored raw, 4 x 1 MiB
        (src / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    tid = store.upload_target(src)
    (key,) = [k for k, _s, _m in store.blob_list(blobs.PACKS)[0]]
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return tid, key, body


@pytest.mark.parametrize("fault", ["reset", "short"])
def test_a_pack_range_cut_midway_is_resumed_where_it_stopped(
    store: S3Store,
    s3_server: S3Server,
    tmp_path: Path,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _tid, key, pack = _pack_of_a_tree(store, tmp_path)
    start, end = 1000, len(pack) - 1000
    before = s3_server.get_count(key)
    s3_server.inject(fault, key=key, after_bytes=(5 << 20) // 2)  # type: ignore[arg-type]
    got = b"".join(store.blob_stream(key, start, end))
    assert got == pack[start:end]
    # the cut GET and one resumed from where it stopped (after the 2 MiB read whole)
    assert s3_server.get_count(key) - before == 2
    resumed_at = [int(n) for n in re.findall(r"\(at byte (\d+)\); resuming", caplog.text)]
    assert len(resumed_at) == 1 and start < resumed_at[0] < end


def test_a_pack_range_that_keeps_failing_is_a_transient_error_naming_it(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    _tid, key, pack = _pack_of_a_tree(store, tmp_path)
    before = s3_server.get_count(key)
    s3_server.inject("reset", key=key, after_bytes=64 * 1024, times=FAST.attempts)
    with pytest.raises(StorageError, match=rf"bytes 0-{len(pack) - 1} failed after 4 attempt"):
        b"".join(store.blob_stream(key, 0, len(pack)))
    assert s3_server.get_count(key) - before == FAST.attempts


def test_a_server_ignoring_the_range_of_a_pack_is_refused(
    store: S3Store, s3_server: S3Server, tmp_path: Path
) -> None:
    """The whole object where a range was asked would be read as the range's bytes."""
    _tid, key, pack = _pack_of_a_tree(store, tmp_path)
    s3_server.inject("ignore-range", key=key)
    with pytest.raises(
        StorageError,
        match=r"asked for bytes 10-\d+, the server answered the whole object \(a server that "
        r"ignores Range",
    ):
        b"".join(store.blob_stream(key, 10, len(pack)))


def test_a_get_of_a_manifest_target_survives_a_cut_pack_download(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    from forgespace.cache.workspace import WorkspaceCache

    store = S3Store.from_settings(s3_settings, retry=FAST)
    tid, key, _pack = _pack_of_a_tree(store, tmp_path)
    before = s3_server.get_count(key)
    s3_server.inject("reset", key=key, after_bytes=(5 << 20) // 2)
    ws = Path(WorkspaceCache(s3_settings).get_target(tid, None, "shared"))
    src = next(tmp_path.glob("tree-*"))
    assert {p.name: p.read_bytes() for p in ws.iterdir()} == {
        p.name: p.read_bytes() for p in src.iterdir()
    }
    assert s3_server.get_count(key) - before == 2
