"""LocalStore specifics: on-disk layout, sidecar, atomic writes, size checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from forgespace.errors import IntegrityError, UnsafeArchiveError
from forgespace.storage.local import SIDECAR_NAME, LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_layout_and_sidecar(store: LocalStore, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    tid = store.upload_target(_file(tmp_path, data))
    obj = store.root / tid / "target"
    assert obj.read_bytes() == data
    meta = json.loads((store.root / tid / SIDECAR_NAME).read_text())
    assert meta["size"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    # no temp files left next to the object
    assert sorted(os.listdir(store.root / tid)) == sorted(["target", SIDECAR_NAME])


def test_grown_object_fails_the_size_check(store: LocalStore, tmp_path: Path) -> None:
    tid = store.upload_target(_file(tmp_path, b"x" * 1000))
    with open(store.root / tid / "target", "ab") as f:
        f.write(b"extra")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="1005 bytes but the object has 1000"):
        store.download_target(tid, out / "target")
    assert os.listdir(out) == []


def test_unreadable_sidecar_falls_back_to_size(store: LocalStore, tmp_path: Path) -> None:
    tid = store.upload_target(_file(tmp_path, b"payload"))
    (store.root / tid / SIDECAR_NAME).write_text("{not json")
    info = store.stat_target(tid)
    assert (info.size, info.sha256) == (7, None)
    store.download_target(tid, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == b"payload"


def test_failed_directory_upload_leaves_nothing(store: LocalStore, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.txt").write_text("fine")
    (tree / "escape").symlink_to("/etc")
    with pytest.raises(UnsafeArchiveError, match="escape"):
        store.upload_target(tree)
    assert not store.root.exists() or list(store.root.rglob("*")) == []


def test_progress_reports_up_to_the_total(store: LocalStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    calls: list[tuple[int, int]] = []
    tid = store.upload_target(_file(tmp_path, data), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    store.download_target(tid, tmp_path / "dest", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(data), len(data))


def test_download_replaces_an_existing_dest(store: LocalStore, tmp_path: Path) -> None:
    tid = store.upload_target(_file(tmp_path, b"new"))
    dest = _file(tmp_path, b"old content", "dest")
    store.download_target(tid, dest)
    assert dest.read_bytes() == b"new"


def test_results_live_apart_from_targets(store: LocalStore) -> None:
    loc = Path(store.put_result("wf/run-1.sarif", b"{}", "application/sarif+json"))
    assert loc == store.root / ".results" / "wf" / "run-1.sarif"
    assert loc.read_bytes() == b"{}"
    for bad in ("/abs.json", "../up.json", "a/../../up.json", ""):
        with pytest.raises(ValueError, match="result key"):
            store.put_result(bad, b"{}")
