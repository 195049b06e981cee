"""Incremental uploads read each file once (storage/blobs.py ``store_tree``): what is stored is
exactly what was read, duplicates are stored once, packs are sent while the next is written,
and a refused or failed upload leaves nothing a manifest could name -- through both stores."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.procs import make_project, tree_digest, wait_for

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.errors import StorageError, UnsafeArchiveError
from forgespace.storage import blobs
from forgespace.storage.manifest import FileEntry, Manifest, parse_manifest
from forgespace.storage.pack import content_id

pytestmark = pytest.mark.integration

BIG = blobs._WHOLE_MAX + 3 * blobs._CHUNK + 123  # read chunk by chunk (streamed)


def _manifest(store: Any, tid: str, tmp: Path) -> Manifest:
    dest = tmp / f"{tid}.manifest"
    store.download_target(tid, dest)
    return parse_manifest(dest.read_bytes(), tid)


def _pack_rows(store: Any) -> dict[str, list[list[Any]]]:
    """pack -> its index rows [digest, offset, length, codec, size]."""
    import gzip
    import json

    out = {}
    for key, _s, _m in store.blob_list(blobs.INDEX)[0]:
        out[key[len(blobs.INDEX) :]] = json.loads(gzip.decompress(store.blob_get(key)))["blobs"]
    return out


def _get(settings: Settings, tid: str) -> Path:
    """A cold shared get (every blob fetched and verified by its sha256)."""
    return Path(WorkspaceCache(settings).get_target(tid, None, workspace_isolation="shared"))


def _text(n: int, seed: str) -> bytes:
    """``n`` bytes that compress (the pack stores them zlib-compressed)."""
    rng = random.Random(seed)
    words = [hashlib.sha256(f"{seed}{i}".encode()).hexdigest()[:8].encode() for i in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def test_duplicates_within_one_upload_are_stored_once(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    store: Any = open_store(any_store_settings)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    small, big = _text(5000, "small"), _text(BIG, "big")
    for name in ("one.txt", "a/two.txt", "a/three.txt"):
        (src / name).write_bytes(small)
    for name in ("big1.bin", "a/big2.bin"):  # the second is streamed, then cut off the pack
        (src / name).write_bytes(big)
    (src / "other.txt").write_bytes(b"other\n")
    tid = store.upload_target(src)
    packs = _pack_rows(store)
    rows = [r for rs in packs.values() for r in rs]
    digests = sorted(r[0] for r in rows)
    want = sorted(hashlib.sha256(d).hexdigest() for d in (small, big, b"other\n"))
    assert digests == want  # each distinct content once
    for pack, prs in packs.items():
        data = store.blob_get(blobs.PACKS + pack)
        assert hashlib.sha256(data).hexdigest() == pack  # the cut-off blob left no trace
        assert len(data) == sum(r[2] for r in prs)
    assert [r[3] for r in rows if r[0] == hashlib.sha256(big).hexdigest()] == ["z"]
    assert tree_digest(_get(any_store_settings, tid)) == tree_digest(src)


def test_a_file_changed_after_the_walk_is_stored_as_read(
    any_store_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest recorded is the digest of the bytes stored: a file rewritten between the
    walk and its read is stored with its new bytes under their own digest, and the tree gets
    the id of what was stored."""
    store: Any = open_store(any_store_settings)
    src = make_project(tmp_path / "src", files=10)
    victim, big = src / "pkg1" / "sub1" / "f1.py", src / "big.bin"
    big.write_bytes(_text(BIG, "before"))
    known = blobs.known_blobs

    def rewrite_then_known(io: Any) -> Any:  # runs after the walk, before any file is read
        victim.write_bytes(b"rewritten during the upload\n" * 50)
        big.write_bytes(_text(BIG + 7, "after"))
        return known(io)

    monkeypatch.setattr(blobs, "known_blobs", rewrite_then_known)
    tid = store.upload_target(src)
    monkeypatch.setattr(blobs, "known_blobs", known)
    m = _manifest(store, tid, tmp_path)
    by_path = {f.path: f for f in m.files}
    for path in (victim, big):
        f: FileEntry = by_path[path.relative_to(src).as_posix()]
        data = path.read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert tree_digest(_get(any_store_settings, tid)) == tree_digest(src)
    other = open_store(any_store_settings)
    assert other.upload_target(src) == tid == content_id("tree", m.tree)  # same content, same id


_WRITER = """
import os, sys, time
path, started, stop = sys.argv[1:4]
size = os.path.getsize(path)
fd = os.open(path, os.O_WRONLY)
open(started, "w").close()
i = 0
while not os.path.exists(stop):
    i += 1
    os.pwrite(fd, bytes([i % 251]) * 65536, (i * 1048573) % (size - 65536))
    time.sleep(0.0005)
os.close(fd)
"""


def test_a_file_written_by_another_process_during_uploads_never_gets_a_wrong_digest(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    """Another process keeps rewriting a large file while it is uploaded again and again:
    whatever bytes each upload read, every stored blob matches its recorded digest (a cold
    get verifies each one and rebuilds the file with exactly that digest)."""
    store: Any = open_store(any_store_settings)
    src = make_project(tmp_path / "src", files=5)
    hot = src / "hot.bin"
    hot.write_bytes(_text(BIG, "hot"))
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(hot), str(started), str(stop)])
    try:
        wait_for(started.exists, 60, "the writer process to start")
        digests = set()
        for i in range(4):
            tid = store.upload_target(src)
            entry = next(f for f in _manifest(store, tid, tmp_path).files if f.path == "hot.bin")
            settings = dataclasses.replace(any_store_settings, cache_dir=tmp_path / f"c{i}")
            got = _get(settings, tid) / "hot.bin"
            data = got.read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
            digests.add(entry.sha256)
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert writer.returncode == 0
    assert len(digests) > 1  # the writer really changed the file between uploads


def test_packs_are_split_and_a_failed_pack_send_publishes_nothing(
    any_store_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: Any = open_store(any_store_settings)
    monkeypatch.setattr(blobs, "PACK_MAX", 300)  # a few blobs per pack
    src = make_project(tmp_path / "src", files=40, size=3000, seed="split")
    tid = store.upload_target(src)
    assert len(_pack_rows(store)) > 3
    assert tree_digest(_get(any_store_settings, tid)) == tree_digest(src)

    second = make_project(tmp_path / "second", files=40, size=3000, seed="fails")
    put = store.blob_put
    calls: list[str] = []

    def failing_put(key: str, data: Any) -> None:
        if key.startswith(blobs.PACKS):
            calls.append(key)
            if len(calls) == 2:
                time.sleep(0.2)  # the writer has moved on to the next pack meanwhile
                raise StorageError("injected: the store refused a pack")
        put(key, data)

    monkeypatch.setattr(store, "blob_put", failing_put)
    before = {o.key for o in store.list_targets()}
    with pytest.raises(StorageError, match="injected"):
        store.upload_target(second)
    assert {o.key for o in store.list_targets()} == before  # no manifest published
    assert store.blob_list(blobs.LEASES)[0] == []  # the lease ended with the upload
    if any_store_settings.storage_backend == "local":
        assert list((any_store_settings.storage_dir / "_blobs" / "tmp").iterdir()) == []


def test_a_refused_tree_is_refused_before_anything_is_read_or_sent(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    store: Any = open_store(any_store_settings)
    src = make_project(tmp_path / "src", files=20)
    os.symlink("../../outside", src / "zz-escaping-link")  # walked last
    with pytest.raises(UnsafeArchiveError, match="zz-escaping-link"):
        store.upload_target(src)
    assert store.list_targets() == []
    for prefix in (blobs.PACKS, blobs.INDEX, blobs.LEASES):
        assert store.blob_list(prefix)[0] == []
