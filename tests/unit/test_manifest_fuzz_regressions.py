"""Inputs the manifest fuzzer (fuzz/fuzz_manifest.py) found crashing the readers of incremental
targets, each rebuilt here in its smallest form: a manifest or a pack index from the store is
untrusted, and must end in the documented refusal instead of a raw exception."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from forgespace.errors import IntegrityError
from forgespace.storage import blobs
from forgespace.storage.local import LocalStore
from forgespace.storage.manifest import MANIFEST_MAGIC, parse_manifest, walk_tree

# Deeper than any recursion limit CPython's json decoder can meet, yet 133 bytes of gzip.
DEEP = b"[" * 100_000


def test_manifest_nested_too_deep_is_an_integrity_error() -> None:
    """json.loads raises RecursionError (not a ValueError) for deeply nested JSON."""
    assert sys.getrecursionlimit() < len(DEEP)
    with pytest.raises(IntegrityError, match=r"target t1 is not a valid forgespace manifest: "):
        parse_manifest(MANIFEST_MAGIC + gzip.compress(DEEP, mtime=0), "target t1")


# A gzip header, then a stored deflate block whose length and its complement disagree: gzip
# reports it as zlib.error, which is not an OSError like its other failures.
BAD_DEFLATE = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\x01\x05\x00\x00\x00"


@pytest.mark.parametrize(
    "index", [gzip.compress(DEEP, mtime=0), BAD_DEFLATE], ids=["nested-too-deep", "bad-deflate"]
)
def test_unreadable_pack_index_is_ignored(tmp_path: Path, index: bytes) -> None:
    """An upload reads every pack index of the store: one it cannot read is skipped (its blobs
    are sent again), not a RecursionError or zlib.error ending the upload. The other packs'
    blobs stay known."""
    store = LocalStore(tmp_path / "store")
    known: list[str] = []
    for name in ("one", "two"):
        src = tmp_path / name
        src.mkdir()
        (src / f"{name}.txt").write_text(f"content of {name}\n")
        m, _stats = blobs.store_tree(store, walk_tree(src))
        known.append(m.files[0].sha256)
    assert set(blobs.known_blobs(store)) == set(known)
    first = blobs.known_blobs(store)[known[0]].pack
    path = store.root / "_blobs" / "index" / first
    assert json.loads(gzip.decompress(path.read_bytes()))["pack"] == first
    path.write_bytes(index)
    assert set(blobs.known_blobs(store)) == {known[1]}


@pytest.mark.parametrize(
    "bad",
    [
        {"off": "0"},  # a string offset
        {"length": -1},
        {"size": True},  # a bool is not an int here
        {"codec": "lz4"},
        {"digest": "A" * 64},  # not lowercase hex
    ],
    ids=["string-offset", "negative-length", "bool-size", "unknown-codec", "upper-hex"],
)
def test_a_pack_index_with_a_forged_row_is_ignored_whole(
    tmp_path: Path, bad: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """A pack index is untrusted like a manifest: one row that names no real location makes
    the whole index ignored (logged), so an upload sends its blobs again rather than trusting
    a forged location; the index it writes then is read again."""
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("content of a\n")
    (src / "b.txt").write_text("content of b\n")
    m, _stats = blobs.store_tree(store, walk_tree(src))
    pack = m.files[0].pack
    path = store.root / "_blobs" / "index" / pack
    doc = json.loads(gzip.decompress(path.read_bytes()))
    digest, off, length, codec, size = doc["blobs"][0]
    row = {"digest": digest, "off": off, "length": length, "codec": codec, "size": size, **bad}
    doc["blobs"][0] = [row["digest"], row["off"], row["length"], row["codec"], row["size"]]
    path.write_bytes(gzip.compress(json.dumps(doc).encode(), mtime=0))
    assert blobs.known_blobs(store) == {}  # the good row of that index is not trusted either
    assert f"ignoring the unreadable pack index _blobs/index/{pack}" in caplog.text
    again, stats = blobs.store_tree(store, walk_tree(src))
    assert stats.new_blobs == 2  # both sent again (the same pack, named by its content)
    assert set(blobs.known_blobs(store)) == {f.sha256 for f in again.files}


@pytest.mark.parametrize(
    ("field", "value"),
    [("offset", 10 * 2**63), ("size", 2**63), ("length", 2**63 - 1)],
    ids=["offset", "size", "offset-plus-length"],
)
def test_blob_range_beyond_a_file_offset_is_an_integrity_error(
    tmp_path: Path, field: str, value: int
) -> None:
    """A blob offset past 2**63 - 1 reached LocalStore's seek as a raw ValueError ("cannot fit
    'int' into an offset-sized integer") on a get; such sizes and ranges are refused when the
    manifest is read, for every store."""
    row: dict[str, object] = {"size": 6, "offset": 1, "length": 6}
    row[field] = value
    entry = ["f", "a.txt", 0, row["size"], "0" * 64, "1" * 64, row["offset"], row["length"], "raw"]
    body = {"format": "forgespace-manifest", "version": 1, "tree": "x", "entries": [entry]}
    data = MANIFEST_MAGIC + gzip.compress(json.dumps(body).encode(), mtime=0)
    with pytest.raises(IntegrityError, match=r"entry 0 has a size or blob range beyond"):
        parse_manifest(data, "target t1")
    row[field] = 2**62  # a large value a file offset can hold is a manifest like any other
    entry = ["f", "a.txt", 0, row["size"], "0" * 64, "1" * 64, row["offset"], row["length"], "raw"]
    body["entries"] = [entry]
    parsed = parse_manifest(MANIFEST_MAGIC + gzip.compress(json.dumps(body).encode()), "t1")
    assert getattr(parsed.files[0], field) == 2**62


def test_local_store_sidecar_nested_too_deep_is_ignored(tmp_path: Path) -> None:
    """A sidecar (``target.meta.json``) that json cannot read without recursing past the
    limit counts as no metadata (the object is then checked by its size, like an object of
    another client), not a RecursionError ending every get of the target."""
    store = LocalStore(tmp_path / "store")
    f = tmp_path / "one.bin"
    f.write_bytes(b"payload\n")
    tid = store.upload_target(f)
    store.object_path(tid).with_name("target.meta.json").write_bytes(DEEP)
    info = store.stat_target(tid)
    assert (info.size, info.sha256) == (8, None)
    store.download_target(tid, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"payload\n"
