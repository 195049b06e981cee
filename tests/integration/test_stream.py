"""The streamed cold path (cache/streamed.py): a tar target is extracted while it downloads,
from both stores (local, and S3 over HTTP to moto), and published only once the download
verified; bad input mid-stream publishes nothing, removes the staging directory and names
the target."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
from support.procs import make_project, tree_digest
from support.s3server import S3Server

from forgespace.cache.hooks import Phase
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import IntegrityError, StorageError, UnsafeArchiveError
from forgespace.storage.base import target_key
from forgespace.storage.retry import RetryPolicy
from forgespace.storage.s3 import S3Store

pytestmark = pytest.mark.integration

MODES = ["shared", "copy-on-write", "isolated"]
TAR_MODES = {"tar": "w", "tgz": "w:gz", "tbz2": "w:bz2", "txz": "w:xz"}
BIG = 3 * 1024 * 1024  # several download chunks after the first members


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_600_000_000
    tf.addfile(info, io.BytesIO(data))


def _archive(path: Path, mode: str, *, hostile_middle: bool = False) -> Path:
    """A small first member, then incompressible bulk (so the object spans several chunks),
    optionally a member escaping the workspace, then more bulk and a last member."""
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        _add(tf, "first.txt", b"first member\n")
        _add(tf, "bulk/a.bin", os.urandom(BIG))
        if hostile_middle:
            _add(tf, "../escaped.txt", b"must never be written\n")
        _add(tf, "bulk/b.bin", os.urandom(BIG))
        _add(tf, "last.txt", b"last member\n")
    return path


def _get(cache: WorkspaceCache, tid: str, mode: str) -> str:
    return cache.get_target(tid, "run-1", workspace_isolation=mode)


def _assert_nothing_left(cache: WorkspaceCache, tid: str) -> None:
    """Nothing published for ``tid`` and no staging directory left behind."""
    tdir = cache.layout.target_dir(tid)
    published = sorted(os.listdir(tdir)) if tdir.is_dir() else []
    assert published == [], published
    tmp = cache.layout.tmp_dir
    assert not tmp.is_dir() or os.listdir(tmp) == [], os.listdir(tmp)


class _HoldAtDownload:
    """Hooks pausing the download (in its progress callback) until ``go`` is set."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.go = threading.Event()

    def reached(self, phase: Phase) -> None:
        if phase == Phase.DOWNLOAD and not self.arrived.is_set():
            self.arrived.set()
            assert self.go.wait(60)


def _staged_file(cache: WorkspaceCache, name: str) -> Path | None:
    tmp = cache.layout.tmp_dir
    for stage in os.listdir(tmp) if tmp.is_dir() else []:
        found = tmp / stage / "workspace" / name
        if found.exists():
            return found
    return None


@pytest.mark.parametrize("fmt", sorted(TAR_MODES))
def test_every_tar_compression_extracts_while_it_downloads(
    any_store_settings: Settings, tmp_path: Path, fmt: str
) -> None:
    """The first members are extracted while the download is held after its first chunk,
    the workspace is published only after the rest arrived, and it equals the archive."""
    archive = _archive(tmp_path / f"t.{fmt}", TAR_MODES[fmt])
    hooks = _HoldAtDownload()
    cache = WorkspaceCache(any_store_settings, hooks=hooks)
    tid = cache.store.upload_target(archive, target_id=f"stream-{fmt}")
    got: list[str | BaseException] = []

    def get() -> None:
        try:
            got.append(_get(cache, tid, "shared"))
        except BaseException as exc:  # reported by the main thread
            got.append(exc)

    getter = threading.Thread(target=get)
    getter.start()
    try:
        assert hooks.arrived.wait(60)
        pause = threading.Event()
        for _ in range(1200):  # bounded wait for the helper thread, not a timing assumption
            staged = _staged_file(cache, "first.txt")
            if staged is not None and staged.read_bytes() == b"first member\n":
                break
            pause.wait(0.05)
        else:
            raise AssertionError("the first member was not extracted while the download waited")
        assert not cache.layout.shared_workspace(tid).exists()  # not published mid-download
    finally:
        hooks.go.set()
        getter.join(120)
    assert len(got) == 1 and isinstance(got[0], str), got
    want = tmp_path / "want"
    with tarfile.open(archive) as tf:
        tf.extractall(want, filter="data")
    assert tree_digest(Path(got[0])) == tree_digest(want)


@pytest.mark.parametrize("mode", MODES)
def test_a_directory_upload_streams_into_every_mode(
    any_store_settings: Settings, tmp_path: Path, mode: str
) -> None:
    cache = WorkspaceCache(any_store_settings)
    project = make_project(tmp_path / "project", files=60, size=20_000)
    tid = cache.store.upload_target(project)
    path = Path(_get(cache, tid, mode))
    assert path.name == "workspace"
    assert tree_digest(path) == tree_digest(project)


@pytest.mark.parametrize("mode", MODES)
def test_a_hostile_member_mid_archive_publishes_nothing(
    any_store_settings: Settings, tmp_path: Path, mode: str
) -> None:
    cache = WorkspaceCache(any_store_settings)
    archive = _archive(tmp_path / "evil.tgz", "w:gz", hostile_middle=True)
    tid = cache.store.upload_target(archive, target_id="evil-middle")
    with pytest.raises(UnsafeArchiveError) as err:
        _get(cache, tid, mode)
    assert "target evil-middle" in str(err.value) and "../escaped.txt" in str(err.value)
    _assert_nothing_left(cache, tid)
    assert not (cache.layout.root / "escaped.txt").exists()
    assert not list(cache.layout.root.parent.rglob("escaped.txt"))


def _record_wrong_digest(settings: Settings, store: object, tid: str) -> None:
    """Make the store record a sha256 that the (unchanged) bytes do not have."""
    wrong = "0" * 64
    if settings.storage_backend == "local":
        sidecar = Path(settings.storage_dir) / tid / "target.meta.json"
        meta = json.loads(sidecar.read_text())
        meta["sha256"] = wrong
        sidecar.write_text(json.dumps(meta))
        return
    assert isinstance(store, S3Store)
    key = target_key(tid)
    store.client.copy_object(
        Bucket=store.bucket,
        Key=key,
        CopySource={"Bucket": store.bucket, "Key": key},
        Metadata={"sha256": wrong},
        MetadataDirective="REPLACE",
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_digest_found_at_the_end_publishes_nothing(
    any_store_settings: Settings, tmp_path: Path, mode: str
) -> None:
    """The whole archive extracts fine while it streams; only the digest at the end is
    wrong, and that alone keeps the workspace from being published."""
    cache = WorkspaceCache(any_store_settings)
    tid = cache.store.upload_target(_archive(tmp_path / "t.tgz", "w:gz"), target_id="bad-sum")
    _record_wrong_digest(any_store_settings, cache.store, tid)
    with pytest.raises(IntegrityError) as err:
        _get(cache, tid, mode)
    assert "target bad-sum" in str(err.value) and "sha256" in str(err.value)
    _assert_nothing_left(cache, tid)


@pytest.mark.parametrize("mode", MODES)
def test_a_local_object_cut_short_publishes_nothing(tmp_path: Path, mode: str) -> None:
    """The local store's cut stream: the object file ends early (its size is recorded)."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(_archive(tmp_path / "t.tgz", "w:gz"), target_id="cut")
    obj = Path(settings.storage_dir) / tid / "target"
    os.truncate(obj, obj.stat().st_size // 2)
    with pytest.raises(IntegrityError) as err:
        _get(cache, tid, mode)
    assert "target cut" in str(err.value)
    _assert_nothing_left(cache, tid)


@pytest.mark.parametrize("mode", MODES)
def test_an_s3_stream_cut_mid_object_publishes_nothing(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path, mode: str
) -> None:
    """Every attempt's connection is reset mid-body: the download gives up, the extraction
    following it stops, nothing is published and the error names the target."""
    store = S3Store.from_settings(s3_settings, retry=RetryPolicy(attempts=3, base=0.01, cap=0.02))
    cache = WorkspaceCache(s3_settings, store=store)
    tid = store.upload_target(_archive(tmp_path / "t.tgz", "w:gz"), target_id="cut-s3")
    s3_server.inject("reset", key=target_key(tid), times=3, after_bytes=BIG // 2)
    with pytest.raises(StorageError) as err:
        _get(cache, tid, mode)
    assert "cut-s3" in str(err.value)
    _assert_nothing_left(cache, tid)


def test_a_cut_that_resumes_still_extracts_exactly(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    """A reset mid-body is resumed with a Range GET; the extraction following the file sees
    one continuous stream and the workspace equals the archive."""
    cache = WorkspaceCache(s3_settings)
    archive = _archive(tmp_path / "t.txz", "w:xz")
    tid = cache.store.upload_target(archive, target_id="resumed")
    s3_server.inject("reset", key=target_key(tid), times=1, after_bytes=BIG // 2)
    path = Path(_get(cache, tid, "isolated"))
    assert s3_server.pending_faults() == 0
    want = tmp_path / "want"
    with tarfile.open(archive) as tf:
        tf.extractall(want, filter="data")
    assert tree_digest(path) == tree_digest(want)


@pytest.mark.parametrize("mode", ["shared", "isolated"])
def test_a_download_that_starts_over_is_extracted_from_the_verified_file(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path, mode: str
) -> None:
    """The resume GET is answered with the whole object (a server ignoring Range): the
    download starts over, which voids what the extraction read; the workspace is then
    extracted from the verified file and equals the archive."""
    cache = WorkspaceCache(s3_settings)
    archive = _archive(tmp_path / "t.tgz", "w:gz")
    tid = cache.store.upload_target(archive, target_id="restarted")
    key = target_key(tid)
    s3_server.inject("reset", key=key, times=1, after_bytes=BIG)
    s3_server.inject("ignore-range", key=key, times=1)
    path = Path(_get(cache, tid, mode))
    assert s3_server.pending_faults() == 0
    want = tmp_path / "want"
    with tarfile.open(archive) as tf:
        tf.extractall(want, filter="data")
    assert tree_digest(path) == tree_digest(want)
    tmp = cache.layout.tmp_dir
    assert not tmp.is_dir() or os.listdir(tmp) == []


def test_a_zip_and_a_plain_file_still_work_from_s3(s3_settings: Settings, tmp_path: Path) -> None:
    """Not streamed (a zip needs its central directory; a file is no archive): extracted or
    kept from the verified file as before."""
    import zipfile

    cache = WorkspaceCache(s3_settings)
    zpath = tmp_path / "t.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("inside.txt", "zip member\n")
    ztid = cache.store.upload_target(zpath, target_id="a-zip")
    assert (Path(_get(cache, ztid, "shared")) / "inside.txt").read_text() == "zip member\n"
    fpath = tmp_path / "plain.bin"
    fpath.write_bytes(os.urandom(100_000))
    ftid = cache.store.upload_target(fpath, target_id="a-file")
    got = Path(_get(cache, ftid, "isolated"))
    assert got.name == "target" and got.read_bytes() == fpath.read_bytes()


_RSS_GETTER = """
import resource, sys
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
cache = WorkspaceCache(Settings.from_env())
cache.store.stat_target(sys.argv[1])  # warm up client and connection pool first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path = cache.get_target(sys.argv[1], "rss", workspace_isolation="isolated")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, path)
"""


@pytest.mark.slow
def test_a_200mb_streamed_get_target_runs_in_bounded_memory(
    s3_settings: Settings, tmp_path: Path
) -> None:
    """Downloading, hashing and extracting at once never buffers the object: the peak RSS of
    a 200 MB tar.gz get_target grows by well under 100 MB."""
    import subprocess
    import sys

    from support.s3server import env_for

    archive = tmp_path / "big.tgz"
    block = os.urandom(1 << 20)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        for i in range(4):
            data = b"".join(i.to_bytes(4, "big") + j.to_bytes(4, "big") + block[8:]
                            for j in range(50))  # fmt: skip
            _add(tf, f"part{i}.bin", data)
    store = S3Store.from_settings(s3_settings)
    tid = store.upload_target(archive, target_id="big-stream")
    archive.unlink()
    out = subprocess.run(
        [sys.executable, "-c", _RSS_GETTER, tid],
        env=env_for(s3_settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    before_kb, after_kb, path = out.stdout.split()
    assert Path(path, "part3.bin").stat().st_size == 50 << 20
    assert int(after_kb) - int(before_kb) < 100 * 1024, (before_kb, after_kb)
