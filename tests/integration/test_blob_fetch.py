"""The local pack a cold get writes (cache/blobstore.py ``_Sink``): blobs are queued and written
a few MiB at a time, the builder takes a queued blob from memory and a written one from the
pack; whichever way a blob goes, the workspace and the pack hold exactly its verified bytes,
and a blob failing its digest after part of it reached the disk leaves nothing behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from support.procs import tree_digest, wait_for

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache import blobstore
from forgespace.errors import IntegrityError
from forgespace.storage.manifest import FileEntry, Manifest, encode_manifest, parse_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(blobstore, "_FLUSH_AT", 1000)  # most blobs go to disk mid-fetch
    monkeypatch.setattr(blobstore, "_KEEP", 3000)  # and most of those are read back from it
    return Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )


def _local_packs(settings: Settings) -> dict[str, bytes]:
    """digest -> bytes, read back from the cache's local packs through their indexes."""
    return _local_packs_in(settings.cache_dir / ".forgespace" / "blobs")


def _local_packs_in(blob_dir: Path) -> dict[str, bytes]:
    """digest -> bytes of the local packs in ``blob_dir``."""
    out = {}
    for idx in blob_dir.glob("*.idx"):
        pack = idx.with_suffix(".pack").read_bytes()
        for digest, offset, size in json.loads(idx.read_bytes()):
            out[digest] = pack[offset : offset + size]
    return out


def test_blobs_queued_or_written_build_the_same_tree(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    sizes = [10, 900, 999, 1000, 1001, 2500, 7000, 40]
    for i, n in enumerate(sizes):
        (src / "d" / f"rand{i}").write_bytes(os.urandom(n))  # raw blobs
        (src / f"text{i}").write_bytes((f"line {i}\n" * n).encode()[: n * 3])  # compressed
    (src / "dup").write_bytes((src / "text6").read_bytes())
    # Read in two chunks, the second below _FLUSH_AT: half on disk, half queued when it
    # verifies; the last blob of the pack, so no later blob's write flushes it by chance.
    (src / "zz-last").write_bytes(os.urandom((1 << 20) + 500))
    tid = open_store(settings).upload_target(src)
    cache = WorkspaceCache(settings)
    ws = Path(cache.get_target(tid, None, workspace_isolation="shared"))
    assert tree_digest(ws) == tree_digest(src)
    packs = _local_packs(settings)
    assert all(hashlib.sha256(data).hexdigest() == d for d, data in packs.items())
    assert len(packs) == len(sizes) * 2 + 1
    again = Path(cache.get_target(tid, "r", workspace_isolation="isolated"))  # from held packs
    assert tree_digest(again) == tree_digest(src)


def test_written_blobs_the_builder_has_not_taken_stay_in_memory_within_keep(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch running ahead of the build keeps the written blobs the builder has not taken
    in memory, up to _KEEP bytes, and the builder reads the others back from the pack: the
    more kept, the fewer read back; never more than _KEEP kept; the tree exact either way."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"f{i:02}").write_bytes(os.urandom(400))  # _FLUSH_AT is 1000: a flush per 3
    tid = open_store(settings).upload_target(src)
    real_build, real_flush, real_pread = (
        blobstore._build,
        blobstore._Sink._flush,
        blobstore._pread_copy,
    )

    def build_after_fetch(job: Any, blobs: Any) -> Any:  # the fetch ahead by all of it
        with blobs.pending._cond:
            blobs.pending._cond.wait_for(lambda: blobs.pending.ended)
        return real_build(job, blobs)

    kept: list[int] = []
    read_back: list[int] = []

    def flush(sink: Any, keep: int | None = None) -> None:
        real_flush(sink, keep)
        kept.append(sum(sink._placed[d][1] for d in sink._memory))

    def pread(sfd: int, dfd: int, offset: int, size: int, done: int) -> None:
        read_back.append(size)
        real_pread(sfd, dfd, offset, size, done)

    monkeypatch.setattr(blobstore, "_build", build_after_fetch)
    monkeypatch.setattr(blobstore._Sink, "_flush", flush)
    monkeypatch.setattr(blobstore, "_pread_copy", pread)
    counts = []
    for keep in (0, 2000, 1 << 20):
        monkeypatch.setattr(blobstore, "_KEEP", keep)
        kept.clear()
        read_back.clear()
        cache = WorkspaceCache(dataclasses.replace(settings, cache_dir=tmp_path / f"c{keep}"))
        ws = Path(cache.get_target(tid, None, workspace_isolation="shared"))
        assert tree_digest(ws) == tree_digest(src)
        assert kept and max(kept) <= keep
        counts.append(len(read_back))
    assert counts[0] > counts[1] > counts[2], counts


def test_a_blob_taken_while_queued_is_not_kept_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the builder already took does not use the memory kept for what it has not."""
    monkeypatch.setattr(blobstore, "_FLUSH_AT", 1000)
    monkeypatch.setattr(blobstore, "_KEEP", 1 << 20)
    sink = blobstore._Sink(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    blobs = {name: os.urandom(400) for name in ("taken", "waiting", "flushing")}
    for name, data in blobs.items():
        sink.begin(name)
        sink.write(data)
        sink.commit()
        if name == "taken":
            assert sink.wait_for(name)[2] == [data]  # from the queue, before any flush
    assert sink._disk == 1200 and list(sink._memory) == ["waiting"]  # kept, not yet taken
    assert sink.wait_for("waiting")[2] == [blobs["waiting"]]
    assert sink.wait_for("taken")[2] is None  # a second use: from the pack
    assert not sink._memory
    sink.discard()
    os.close(sink.bfd)


def test_a_blob_failing_its_digest_after_reaching_the_disk_leaves_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    store: Any = open_store(settings)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"small and fine\n")
    (src / "b").write_bytes(os.urandom(5000))  # past _FLUSH_AT: written before it is checked
    good = store.upload_target(src)
    dest = tmp_path / "m"
    store.download_target(good, dest)
    m = parse_manifest(dest.read_bytes(), good)
    a, b = m.files
    forged = FileEntry(b.path, False, b.size, "0" * 64, b.pack, b.offset, b.length, b.codec)
    bad = tmp_path / "bad-manifest"
    bad.write_bytes(encode_manifest(Manifest("x", (a, forged))))
    tid = store.upload_target(bad)
    with pytest.raises(IntegrityError, match="does not match its digest"):
        WorkspaceCache(settings).get_target(tid, None, workspace_isolation="shared")
    assert not (settings.cache_dir / tid / "workspace").exists()
    blob_dir = settings.cache_dir / ".forgespace" / "blobs"
    assert [p.name for p in blob_dir.iterdir()] == []  # no pack, no temp file
    ws = WorkspaceCache(settings).get_target(good, None, workspace_isolation="shared")
    assert tree_digest(Path(ws)) == tree_digest(src)


def test_a_blob_inflating_past_its_claimed_size_is_refused_without_inflating_it(
    settings: Settings, tmp_path: Path
) -> None:
    """A manifest claiming 100 bytes for a blob that inflates to 32 MB: IntegrityError, and
    the fetch never holds more than the claim allows (untrusted sizes bound the memory)."""
    store: Any = open_store(settings)
    src = tmp_path / "src"
    src.mkdir()
    (src / "zeros").write_bytes(bytes(32 << 20))  # stored as a ~32 KB zlib blob
    good = store.upload_target(src)
    dest = tmp_path / "m"
    store.download_target(good, dest)
    (z,) = parse_manifest(dest.read_bytes(), good).files
    assert z.codec == "z" and z.length < 1 << 20
    forged = FileEntry(z.path, False, 100, "0" * 64, z.pack, z.offset, z.length, z.codec)
    bad = tmp_path / "bomb-manifest"
    bad.write_bytes(encode_manifest(Manifest("x", (forged,))))
    tid = store.upload_target(bad)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="does not match its digest"):
            WorkspaceCache(settings).get_target(tid, None, workspace_isolation="shared")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes held while refusing a 100-byte claim"
    assert not (settings.cache_dir / tid / "workspace").exists()


def test_a_damaged_local_index_is_ignored_and_its_blobs_fetched_again(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local index that is not valid JSON, or has a malformed row, is ignored whole (logged):
    the get fetches those blobs again instead of trusting part of it. Parsed indexes are kept
    per process; a changed or removed index is read again, never served from memory."""
    caplog.set_level(logging.INFO, logger="forgespace")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(3000 + i))
    tid = open_store(settings).upload_target(src)
    cache = WorkspaceCache(settings)
    assert tree_digest(Path(cache.get_target(tid, "r1", "isolated"))) == tree_digest(src)
    blob_dir = settings.cache_dir / ".forgespace" / "blobs"
    for bad_row in (False, True):
        (idx,) = blob_dir.glob("*.idx")  # the pack the last get fetched
        rows = json.loads(idx.read_bytes())
        damage = json.dumps([*rows[:2], [rows[2][0], 5]]) if bad_row else "[[not json"
        idx.write_text(damage)  # another size: not the index read before
        caplog.clear()
        ws = Path(cache.get_target(tid, f"r-{bad_row}", "isolated"))
        assert tree_digest(ws) == tree_digest(src)
        assert f"ignoring the unreadable index {idx.name}" in caplog.text
        assert "fetched 3 blob(s)" in caplog.text  # none taken from the damaged index
        idx.unlink()  # as a sweep would: one pack holds the blobs
        idx.with_suffix(".pack").unlink()
    # The pack fetched last is held: the next get fetches nothing.
    caplog.clear()
    assert tree_digest(Path(cache.get_target(tid, "r-last", "isolated"))) == tree_digest(src)
    assert "fetched" not in caplog.text
    # Remove every pack: nothing is held any more, whatever the process read before.
    for p in blob_dir.iterdir():
        p.unlink()
    caplog.clear()
    assert tree_digest(Path(cache.get_target(tid, "r-gone", "isolated"))) == tree_digest(src)
    assert "fetched 3 blob(s)" in caplog.text


def test_short_writes_of_the_local_pack_resume_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwritev may write less than asked (a signal, a nearly full disk): the rest of the
    buffer it stopped in, then the following ones, are written after it, nothing twice."""
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: real(fd, [bytes(bufs[0])[:7]], off))
    chunks = [b"first chunk|", b"", b"x" * 20, os.urandom(1000)]
    fd = os.open(tmp_path / "pack", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert blobstore._pwrite_all(fd, chunks, 5) == 5 + sum(map(len, chunks))
        assert os.pread(fd, 2000, 5) == b"".join(chunks)
    finally:
        os.close(fd)


# --- memory first: a sealed tree's fetch (the tree holds the blobs afterwards) -------------


def _memory_sink(tmp_path: Path, uses: dict[str, int]) -> blobstore._Sink:
    return blobstore._Sink(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), uses)


def _blobs(n: int, size: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((hashlib.sha256(data).hexdigest(), data))
    return out


def _fetch_in_thread(sink: blobstore._Sink, blobs: list[tuple[str, bytes]]) -> Any:
    """A fetch thread handing ``blobs`` to ``sink`` in order; returns (thread, the memory
    held after each blob was handed over, errors)."""
    import threading

    held: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for digest, data in blobs:
                sink.begin(digest)
                sink.write(data)
                sink.commit()
                held.append(sink._mem)
        except BaseException as exc:
            errors.append(exc)
            sink.end(exc)
        else:
            sink.end(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, held, errors


def _taken(sink: blobstore._Sink, digest: str) -> bytes:
    offset, size, memory = sink.wait_for(digest)
    if memory is not None:
        return b"".join(memory)
    return os.pread(os.open(sink.tmp, os.O_RDONLY, dir_fd=sink.bfd), size, offset)


def test_memory_first_in_build_order_writes_nothing_and_holds_at_most_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch waits for the builder once _KEEP bytes wait: no blob reaches the disk and no
    local pack is left, however far ahead the fetch could run."""
    monkeypatch.setattr(blobstore, "_KEEP", 2000)
    blobs = _blobs(40, 400)
    sink = _memory_sink(tmp_path, {d: 1 for d, _ in blobs})
    t, held, errors = _fetch_in_thread(sink, blobs)
    wait_for(lambda: len(held) >= 5 or errors, 10, "the fetch to fill its memory")
    t.join(0.2)
    assert t.is_alive() and len(held) == 5  # waits for the builder: 5 x 400 B within _KEEP
    for digest, data in blobs:
        assert _taken(sink, digest) == data
    t.join(10)
    assert not errors and max(held) <= 2000
    assert sink.rows == [] and sink._disk == 0
    sink.finish()
    assert os.listdir(tmp_path) == []  # no pack: the tree holds the blobs
    os.close(sink.bfd)


def test_memory_first_out_of_order_spills_the_newest_to_the_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder needs the last blob first (the fetch and build orders diverge): the fetch
    goes on and spills what waits beyond _KEEP; every blob still reaches the builder exact,
    and the pack published holds exactly the spilled blobs."""
    monkeypatch.setattr(blobstore, "_KEEP", 2000)
    blobs = _blobs(20, 400)
    sink = _memory_sink(tmp_path, {d: 1 for d, _ in blobs})
    t, _held, errors = _fetch_in_thread(sink, blobs)
    for digest, data in reversed(blobs):
        assert _taken(sink, digest) == data
    t.join(10)
    assert not errors and sink.rows
    spilled = {d for d, _o, _s in sink.rows}
    assert spilled <= {d for d, _ in blobs} and len(spilled) < len(blobs)
    sink.finish()
    assert set(_local_packs_in(tmp_path)) == spilled
    assert all(hashlib.sha256(b).hexdigest() == d for d, b in _local_packs_in(tmp_path).items())
    os.close(sink.bfd)


def test_memory_first_keeps_a_blob_for_each_use_and_streams_a_big_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobstore, "_FLUSH_AT", 1000)
    (small, data), (big, big_data) = _blobs(1, 300)[0], _blobs(1, 2500)[0]
    sink = _memory_sink(tmp_path, {small: 2, big: 1})
    sink.begin("refused")  # a blob that fails its digest leaves nothing behind
    sink.write(b"x" * 100)
    sink.abort()
    sink.begin(small)
    sink.write(data)
    sink.commit()
    sink.begin(big)  # past _FLUSH_AT: written to the pack as it comes, not held
    for i in range(0, 2500, 500):
        sink.write(big_data[i : i + 500])
    sink.commit()
    sink.end(None)
    assert sink._queued == 0 and sink._mem == 300
    assert _taken(sink, small) == data and sink._mem == 300  # one use left: still held
    assert _taken(sink, small) == data and sink._mem == 0
    assert sink.wait_for(big)[2] is None and _taken(sink, big) == big_data
    sink.finish()
    assert _local_packs_in(tmp_path) == {big: big_data}
    os.close(sink.bfd)


def test_a_fetch_waiting_for_the_builder_stops_when_the_build_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobstore, "_KEEP", 1000)
    blobs = _blobs(10, 400)
    sink = _memory_sink(tmp_path, {d: 1 for d, _ in blobs})
    t, held, errors = _fetch_in_thread(sink, blobs)
    wait_for(lambda: len(held) >= 2 or errors, 10, "the fetch to fill its memory")
    sink.cancel()
    t.join(10)
    assert not t.is_alive() and errors and isinstance(errors[0], blobstore._Cancelled)
    sink.discard()
    assert os.listdir(tmp_path) == []
    os.close(sink.bfd)
