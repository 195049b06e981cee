"""Fuzz the untrusted inputs of incremental targets: manifests, and the packs blobs come from.

Run through libFuzzer (see ``make fuzz``)::

    python fuzz/fuzz_manifest.py NEW_INPUTS_DIR fuzz/corpus/manifest -max_total_time=90

An input starting with the manifest magic line is a manifest (``{id}/target``): it is written
to a file and materialised by ``forgespace.cache.blobstore.materialise`` (what a get does with
a manifest target: ``parse_manifest``, the name and size checks, fetching the blobs this host
lacks with ``fetch_blobs`` and building the workspace by the archive extractor's rules) into a
fresh destination, against a LocalStore holding one small pack of known blobs
(``_manifest_store.py``, the same pack the seeds name) and a cache limited to 64 KiB. The local
blob store is emptied after every input, so every manifest goes through the fetch.

Any other input is a pack as a store returns it: ``fetch_blobs`` decodes the known blobs
(raw and zlib) out of it, served in ranged chunks of a size the input picks, into the worker's
own local-pack sink; the same bytes are also the pack's index for ``known_blobs`` (what an
upload reads), which must ignore an unreadable index rather than raise.

The refusals the modules document (``UnsafeArchiveError``, ``IntegrityError``,
``TargetNotFoundError``, ``CacheFullError``) are expected; any other exception is a finding.
After every input the harness checks, independently of the code under test, the extractor's
promises (``_invariants.py``: nothing touched beside the destination, no destination after a
refusal, only directories, regular files and contained symlinks within the byte limit) and
the blob store's: every regular file of a workspace holds exactly the bytes of a known blob
(no unverified byte reaches a workspace), no temp file is left in the local blob store, and
every blob a local index names has the sha256 it is filed under.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import atheris

# The manifest parser, the blob decoder, the materialiser and the extractor rules it reuses.
with atheris.instrument_imports(
    include=[
        "forgespace.storage.manifest",
        "forgespace.storage.blobs",
        "forgespace.cache.blobstore",
        "forgespace.cache.archive",
    ]
):
    from forgespace.cache import blobstore
    from forgespace.errors import (
        CacheFullError,
        IntegrityError,
        TargetNotFoundError,
        UnsafeArchiveError,
    )
    from forgespace.storage import blobs
    from forgespace.storage.manifest import MANIFEST_MAGIC

# After the block: the cache around the materialiser and the checks are not instrumented.
from _invariants import InvariantError, Sandbox, remove_tree, scratch_root
from _manifest_store import FILES, make_store

from forgespace.cache import snapshot
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

logging.getLogger("forgespace").setLevel(logging.ERROR)  # refusals log warnings by design
MAX_BYTES = 64 * 1024  # CACHE_MAX_SIZE of the harness's cache: a bomb meets it at once
EXPECTED = (UnsafeArchiveError, IntegrityError, TargetNotFoundError, CacheFullError)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNKS = (1, 7, 64, 1 << 20)  # how the fuzzed pack is served: _Reader's joins and skips

BOX = Sandbox(scratch_root(), per_input=["manifest"])
MANIFEST = Path(BOX.root, "manifest")
MANIFEST.write_bytes(b"")  # rewritten by every manifest input
DEST = Path(BOX.dest)
_fixture = Path(BOX.add_fixture("fixture"))
_fixture.mkdir()
STORE, KNOWN = make_store(_fixture)
KNOWN_PACK = KNOWN.files[0].pack
KNOWN_DIGESTS = {hashlib.sha256(data).hexdigest() for data, _x in FILES.values()}
# A whole cache (index, locks) around the materialiser; its limit set below the 1 MiB minimum
# CACHE_MAX_SIZE accepts from the environment, so bombs stop after 64 KiB.
_settings = Settings.from_env(
    {"CACHE_DIR": BOX.add_fixture("cache"), "STORAGE_DIR": str(_fixture / "store")}
)
_cache = WorkspaceCache(dataclasses.replace(_settings, cache_max_size=MAX_BYTES), store=STORE)
ENGINE = _cache._modes  # the Engine a get hands to materialise
BLOB_DIR = Path(_settings.cache_dir, *blobstore.BLOBS)
# Read-only inputs take the memory-first sink a sealed tree's fetch takes on btrfs (the harness
# runs anywhere: the tree itself is then a plain directory), with a _KEEP small enough that
# fetches pause for the builder and spill when a manifest orders its files against the packs.
snapshot.subvolume_possible = lambda path: True  # type: ignore[assignment]
blobstore._KEEP = 4096
SINK_DIR = Path(BOX.add_fixture("sink"))
SINK_DIR.mkdir()


def TestOneInput(data: bytes) -> None:
    """One input: a manifest to materialise or a pack to decode; then the checks."""
    if data.startswith(MANIFEST_MAGIC):
        _one_manifest(data)
    else:
        _one_pack(data)


# ---- manifests ---------------------------------------------------------------------------


def _one_manifest(data: bytes) -> None:
    MANIFEST.write_bytes(data)
    # Deterministic per input, so a crash reproduces; covers the read-only modes too.
    read_only = bool(zlib.crc32(data) & 1)
    built = False
    try:
        try:
            stats = blobstore.materialise(ENGINE, "fuzz", MANIFEST, DEST, read_only=read_only)
        except EXPECTED:
            BOX.check_refused()
        else:
            built = True
            if stats.bytes > MAX_BYTES:
                raise InvariantError(f"stats report {stats.bytes} bytes, above {MAX_BYTES}")
        BOX.check_outside(built)
        if built:
            BOX.check_tree(MAX_BYTES)
            _check_contents()
        _check_local_blobs(BLOB_DIR)
    finally:
        remove_tree(str(DEST))
        _empty(BLOB_DIR)


def _check_contents() -> None:
    """Every regular file of the workspace holds exactly one known blob's bytes."""
    todo = [(os.open(DEST, _OPEN_DIR), "")]
    while todo:
        fd, rel = todo.pop()
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    path = f"{rel}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((os.open(entry.name, _OPEN_DIR, dir_fd=fd), path))
                    elif entry.is_file(follow_symlinks=False):
                        ffd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                        with os.fdopen(ffd, "rb") as f:
                            digest = hashlib.sha256(f.read()).hexdigest()
                        if digest not in KNOWN_DIGESTS:
                            raise InvariantError(f"{path!r} holds bytes no verified blob has")
        finally:
            os.close(fd)


def _check_local_blobs(where: Path) -> None:
    """No temp file left; every blob a local index names has the digest it is filed under."""
    if not where.exists():
        return
    names = os.listdir(where)
    temps = [n for n in names if n.endswith(".tmp")]
    if temps:
        raise InvariantError(f"temp files left in the local blob store: {temps}")
    for idx in (n for n in names if n.endswith(".idx")):
        pack = (where / (idx[: -len(".idx")] + ".pack")).read_bytes()
        for digest, offset, size in json.loads((where / idx).read_bytes()):
            if hashlib.sha256(pack[offset : offset + size]).hexdigest() != digest:
                raise InvariantError(f"the local pack holds an unverified blob {digest}")
            if digest not in KNOWN_DIGESTS:
                raise InvariantError(f"the local pack holds a blob never stored: {digest}")


def _empty(where: Path) -> None:
    if where.exists():
        for name in os.listdir(where):
            os.unlink(where / name)


# ---- packs -------------------------------------------------------------------------------


class _FuzzedStore:
    """A BlobIO whose one pack (the known pack's name) and its index are the input's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.chunk = _CHUNKS[(zlib.crc32(data) >> 1) % len(_CHUNKS)]

    def blob_get(self, key: str) -> bytes:
        if key != blobs.INDEX + KNOWN_PACK:
            raise TargetNotFoundError(key)
        return self.data

    def blob_stream(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if key != blobs.PACKS + KNOWN_PACK:
            raise TargetNotFoundError(key)
        part = self.data[start:end]
        return iter([part[i : i + self.chunk] for i in range(0, len(part), self.chunk)])

    def blob_list(self, prefix: str) -> tuple[blobs.Listing, float]:
        folder = {blobs.PACKS: blobs.PACKS, blobs.INDEX: blobs.INDEX}.get(prefix)
        return ([(folder + KNOWN_PACK, len(self.data), 0.0)] if folder else []), 0.0

    def blob_put(self, key: str, src: Path | bytes) -> None:
        raise AssertionError("the harness's store is read-only")

    def blob_delete(self, key: str) -> None:
        raise AssertionError("the harness's store is read-only")


def _one_pack(data: bytes) -> None:
    io = _FuzzedStore(data)
    blobs.known_blobs(io)  # an unreadable index is logged and ignored, never raised
    files = [f for f in KNOWN.files if f.size]  # what materialise fetches
    bfd = os.open(SINK_DIR, _OPEN_DIR)
    try:
        sink = blobstore._Sink(bfd)
        try:
            blobs.fetch_blobs(io, files, sink)
        except EXPECTED:
            sink.discard()
            if os.listdir(SINK_DIR):
                raise InvariantError("a refused fetch left files in the local blob store") from None
        else:
            sink.finish()
            if {d for d, _o, _s in sink.rows} != {f.sha256 for f in files}:
                raise InvariantError("a fetch returned without every blob it was asked for")
        _check_local_blobs(SINK_DIR)
        BOX.check_outside(False)
    finally:
        os.close(bfd)
        _empty(SINK_DIR)


# ---- mutation ----------------------------------------------------------------------------


def _mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations, applied to a manifest's JSON rather than its gzip bytes: any
    change to a gzip stream breaks its CRC, so byte-level mutations alone would never get a
    changed manifest past the decompressor. One mutation in eight stays at the byte level."""
    if seed % 8 and data.startswith(MANIFEST_MAGIC):
        try:
            body = gzip.decompress(data[len(MANIFEST_MAGIC) :])
        except (OSError, EOFError, zlib.error):
            body = None
        if body is not None:
            out = MANIFEST_MAGIC + gzip.compress(
                atheris.Mutate(body, 2 * len(body) + 64), 6, mtime=0
            )
            if len(out) <= max_size:
                return out
    return atheris.Mutate(data, max_size)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=_mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
