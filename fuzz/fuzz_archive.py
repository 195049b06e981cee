"""Fuzz forgespace's own archive reader: tar (plain, gzip, bzip2, xz), zip and the member checks.

Run through libFuzzer (see ``make fuzz``)::

    python fuzz/fuzz_archive.py NEW_INPUTS_DIR fuzz/corpus/archive -max_total_time=90

Each input is written to a file and handed to ``detect_archive`` and then ``extract_archive``
(and, read as a stream, to ``extract_tar_stream``, which must agree: same tree, same refusal)
with a small byte and member limit, so bombs hit the limits at once. The refusals the module
documents (``UnsafeArchiveError``, ``IntegrityError``, ``CacheFullError``) are expected; any
other exception is a finding (libFuzzer stops and keeps the input). After every input the
harness also checks, independently of the extractor, what it promises (``_invariants.py``):
nothing touched beside the destination, no destination after a refusal, and after a success
only directories, regular files and symlinks resolving inside it, within the byte limit.
"""

from __future__ import annotations

import os
import stat
import sys
import zlib

import atheris

# zipfile is the zip parser the reader relies on: instrument it with our module so the fuzzer
# sees its branches too (it must not be imported before this block for the hook to apply).
with atheris.instrument_imports(include=["forgespace.cache.archive", "zipfile"]):
    from forgespace.cache.archive import detect_archive, extract_archive, extract_tar_stream
    from forgespace.errors import CacheFullError, IntegrityError, UnsafeArchiveError

# After the block: only the reader is instrumented (the checks import fsops).
from _invariants import InvariantError, Sandbox, remove_tree, scratch_root

# Small limits: a bomb is refused after a few chunks instead of inflating megabytes per input.
MAX_BYTES = 64 * 1024
MAX_MEMBERS = 256
EXPECTED = (UnsafeArchiveError, IntegrityError, CacheFullError)

BOX = Sandbox(scratch_root(), per_input=["archive"])
ARCHIVE = os.path.join(BOX.root, "archive")
DEST = BOX.dest


def TestOneInput(data: bytes) -> None:
    """One input: detect, extract with small limits, check the invariants, clean up."""
    with open(ARCHIVE, "wb") as f:
        f.write(data)
    # Deterministic per input, so a crash reproduces; covers the read-only code paths too.
    read_only = bool(zlib.crc32(data) & 1)
    detect_archive(ARCHIVE)  # the artifact rule reads the zip's directory: it must not raise
    kind = detect_archive(ARCHIVE, artifacts=True)  # what extract_archive accepts
    extracted = False
    try:
        if kind is None:
            try:
                extract_archive(ARCHIVE, DEST, max_bytes=MAX_BYTES, max_members=MAX_MEMBERS)
            except UnsafeArchiveError:
                pass
            else:
                raise InvariantError("a non-archive was extracted")
        else:
            try:
                stats = extract_archive(
                    ARCHIVE,
                    DEST,
                    max_bytes=MAX_BYTES,
                    max_members=MAX_MEMBERS,
                    read_only=read_only,
                )
            except EXPECTED:
                pass
            else:
                extracted = True
                if stats.bytes > MAX_BYTES:
                    raise InvariantError(f"stats report {stats.bytes} bytes, above {MAX_BYTES}")
        if not extracted:
            BOX.check_refused()
        BOX.check_outside(extracted)
        if extracted:
            BOX.check_tree(MAX_BYTES)
        _check_streamed(kind, _snapshot(DEST) if extracted else None, read_only)
    finally:
        remove_tree(DEST)


Tree = dict[str, tuple[int, bytes]]


def _snapshot(root: str) -> Tree:
    """rel path -> (mode, content or link target) of a tree, for comparing two extractions."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                body = os.fsencode(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            else:
                body = b""
            out[os.path.relpath(p, root)] = (st.st_mode, body)
    return out


def _check_streamed(kind: str | None, by_file: Tree | None, ro: bool) -> None:
    """The streamed extractor (what a download feeds) must agree with the file extractor: a
    tar it accepts gives the same tree, one it refuses is refused, anything else is left to
    the file path (None, nothing created)."""
    remove_tree(DEST)
    with open(ARCHIVE, "rb", buffering=0) as f:
        try:
            stats = extract_tar_stream(
                f, DEST, archive="fuzz", max_bytes=MAX_BYTES, max_members=MAX_MEMBERS, read_only=ro
            )
        except EXPECTED:
            stats, refused = None, True
        else:
            refused = False
    if kind != "tar":
        if stats is not None or refused or os.path.lexists(DEST):
            raise InvariantError(f"the streamed extractor took a {kind or 'non-archive'}")
        return
    if (by_file is None) != refused:
        said = ("refused", "accepted") if by_file is None else ("accepted", "refused")
        raise InvariantError(f"file extraction {said[0]} what the streamed one {said[1]}")
    if by_file is not None and _snapshot(DEST) != by_file:
        raise InvariantError("the streamed extraction differs from the file extraction")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
