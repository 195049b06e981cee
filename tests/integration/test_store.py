"""The Store contract, run on both backends: the local directory and S3 (moto over HTTP)."""

from __future__ import annotations

import hashlib
import os
import tarfile
import uuid
from pathlib import Path

import pytest
from support.objects import overwrite_keeping_metadata, put_foreign, s3_client

from forgespace.config import Settings
from forgespace.errors import IntegrityError, InvalidIdError, TargetNotFoundError
from forgespace.storage import Store, open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def store(any_store_settings: Settings) -> Store:
    return open_store(any_store_settings)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "README.md").write_text("hello\n")
    (root / "src" / "main.c").write_bytes(os.urandom(200_000))
    (root / "src" / "deep" / "data.bin").write_bytes(b"\x00" * 5000)
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho ok\n")
    run.chmod(0o755)
    (root / "src" / "link.c").symlink_to("main.c")
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_display_name(store: Store, any_store_settings: Settings) -> None:
    expected = "MinIO/S3" if any_store_settings.storage_backend == "s3" else "local store"
    assert store.display_name == expected


def test_file_round_trip_records_size_and_sha(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    tid = store.upload_target(src)
    assert tid == "file-" + _sha(data)[:40]  # a content id
    info = store.stat_target(tid)
    assert (info.size, info.sha256) == (len(data), _sha(data))
    dest = tmp_path / "out" / "target"
    dest.parent.mkdir()
    got = store.download_target(tid, dest)
    assert dest.read_bytes() == data
    assert (got.size, got.sha256) == (len(data), _sha(data))
    assert os.listdir(dest.parent) == ["target"]  # no temp file left behind


def test_every_upload_of_the_same_content_gets_the_same_id(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "same.txt"
    src.write_text("same content")
    ids = {store.upload_target(src) for _ in range(3)}
    other = tmp_path / "other.txt"
    other.write_text("other content")
    assert len(ids) == 1 and store.upload_target(other) not in ids


def test_archive_file_is_uploaded_as_is(store: Store, tmp_path: Path, tree: Path) -> None:
    archive = tmp_path / "project.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="project")
    tid = store.upload_target(archive)
    dest = tmp_path / "got"
    store.download_target(tid, dest)
    assert dest.read_bytes() == archive.read_bytes()


def test_directory_extracts_to_its_contents(store: Store, tmp_path: Path, tree: Path) -> None:
    # the classic layout (one tar.gz per directory); the incremental one (the default, a
    # manifest + blobs) is covered in test_incremental.py
    store.incremental = False  # type: ignore[attr-defined]
    tid = store.upload_target(tree)
    dest = tmp_path / "target"
    store.download_target(tid, dest)
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert all(not n.startswith(("/", "project", "./")) for n in names), names
        assert {t.uname for t in tar.getmembers()} == {""}
        assert {t.uid for t in tar.getmembers()} == {0}
        out = tmp_path / "ws"
        # extraction filters arrived in Python 3.11.4 (the lane's system 3.11 may be older)
        tar.extractall(out, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    assert (out / "README.md").read_text() == "hello\n"
    assert (out / "src" / "main.c").read_bytes() == (tree / "src" / "main.c").read_bytes()
    assert (out / "src" / "deep" / "data.bin").read_bytes() == b"\x00" * 5000
    assert (out / "empty").is_dir()
    assert os.access(out / "run.sh", os.X_OK)
    assert not os.access(out / "README.md", os.X_OK)
    assert (out / "src" / "link.c").is_symlink()
    assert os.readlink(out / "src" / "link.c") == "main.c"


def test_directory_packing_is_deterministic(store: Store, tmp_path: Path, tree: Path) -> None:
    first = store.upload_target(tree, target_id="pack-1")
    # the same tree elsewhere, with other mtimes, packs to the same bytes
    os.utime(tree / "README.md", (1_000_000, 1_000_000))
    second = store.upload_target(tree, target_id="pack-2")
    a, b = store.stat_target(first), store.stat_target(second)
    assert a.sha256 is not None and a.sha256 == b.sha256 and a.size == b.size


def test_foreign_object_downloads_checked_by_size(
    store: Store, any_store_settings: Settings, tmp_path: Path
) -> None:
    tid = "foreign-" + uuid.uuid4().hex[:8]
    data = os.urandom(100_000)
    put_foreign(any_store_settings, tid, data)
    info = store.stat_target(tid)
    assert info.size == len(data) and info.sha256 is None
    dest = tmp_path / "target"
    got = store.download_target(tid, dest)
    assert dest.read_bytes() == data
    assert got.size == len(data) and got.sha256 == _sha(data)


def test_corrupted_object_raises_and_leaves_nothing(
    store: Store, any_store_settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / "blob"
    data = os.urandom(50_000)
    src.write_bytes(data)
    tid = store.upload_target(src)
    overwrite_keeping_metadata(any_store_settings, tid, bytes(reversed(data)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="sha256"):
        store.download_target(tid, out / "target")
    assert os.listdir(out) == []


def test_missing_target(store: Store, tmp_path: Path) -> None:
    tid = str(uuid.uuid4())
    with pytest.raises(TargetNotFoundError, match=tid):
        store.stat_target(tid)
    with pytest.raises(FileNotFoundError):
        store.download_target(tid, tmp_path / "target")
    assert os.listdir(tmp_path) == []


def test_invalid_id_is_rejected_before_any_io(store: Store, tmp_path: Path) -> None:
    for bad in ("../etc", "a/b", "", ".hidden", "target"):
        with pytest.raises(InvalidIdError):
            store.download_target(bad, tmp_path / "x")
    assert os.listdir(tmp_path) == []


def test_delete(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    tid = store.upload_target(src)
    store.delete_target(tid)
    with pytest.raises(TargetNotFoundError):
        store.stat_target(tid)
    store.delete_target(tid)  # deleting again is not an error


def test_put_result(store: Store, any_store_settings: Settings) -> None:
    loc = store.put_result("wf-1/results.json", b'{"findings": 0}')
    if any_store_settings.storage_backend == "s3":
        assert loc == f"s3://{any_store_settings.s3_results_bucket}/wf-1/results.json"
        body = s3_client(any_store_settings).get_object(
            Bucket=any_store_settings.s3_results_bucket, Key="wf-1/results.json"
        )["Body"]
        assert body.read() == b'{"findings": 0}'
    else:
        assert Path(loc).read_bytes() == b'{"findings": 0}'
    with pytest.raises(ValueError, match="result key"):
        store.put_result("../escape.json", b"{}")


def test_list_and_get_results(store: Store) -> None:
    """What fleet advertisements travel through: listing one folder, reading one key."""
    assert store.result_keys("fleet/") == []  # nothing yet (S3: not even the bucket)
    store.put_result("fleet/q@a.json", b"a")
    store.put_result("fleet/q@b.json", b"b")
    store.put_result("fleet/deeper/c.json", b"c")
    store.put_result("wf-1/results.json", b"{}")
    assert store.result_keys("fleet/") == ["fleet/q@a.json", "fleet/q@b.json"]
    assert store.result_keys("fleet/q@b") == ["fleet/q@b.json"]
    assert store.get_result("fleet/q@a.json") == b"a"
    with pytest.raises(FileNotFoundError):
        store.get_result("fleet/none.json")


def test_upload_of_missing_path(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        store.upload_target(tmp_path / "nope")


class _Interrupted(Exception):
    pass


def test_an_exception_from_progress_propagates_and_leaves_nothing(
    store: Store, tmp_path: Path
) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    tid = store.upload_target(src)
    out = tmp_path / "out"
    out.mkdir()

    def stop(done: int, total: int) -> None:
        raise _Interrupted(f"{done}/{total}")

    with pytest.raises(_Interrupted):
        store.download_target(tid, out / "target", progress=stop)
    assert os.listdir(out) == []


def test_progress_reaches_the_total_both_ways(store: Store, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    src = tmp_path / "blob"
    src.write_bytes(data)
    up: list[tuple[int, int]] = []
    tid = store.upload_target(src, progress=lambda d, t: up.append((d, t)))
    assert up and up[-1] == (len(data), len(data))
    down: list[tuple[int, int]] = []
    store.download_target(tid, tmp_path / "dest", progress=lambda d, t: down.append((d, t)))
    assert down[-1] == (len(data), len(data))
    assert [d for d, _ in down] == sorted(d for d, _ in down)
