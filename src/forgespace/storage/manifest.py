"""Target manifests: a directory stored as a list of entries whose file data lives in blobs.

A manifest is what ``{target_id}/target`` holds for a directory uploaded incrementally (see
``forgespace.storage.blobs``): the magic line ``MANIFEST_MAGIC`` and then gzip'd JSON::

    {"format": "forgespace-manifest", "version": 1, "tree": <tree digest>,
     "entries": [["d", path], ["f", path, exec, size, sha256, pack, offset, length, codec],
                 ["l", path, link target], ...]}

Entries come in the order of ``pack_directory``'s walk, and the tree digest is computed from the
same records (``forgespace.storage.pack``), so a directory gets the same ``tree-…`` id whether
it is stored as an archive or as a manifest.

A manifest read back is untrusted input, exactly like an archive: ``parse_manifest`` checks its
shape and types only (IntegrityError naming what is wrong); its paths and links are judged by
the archive safety policy when the cache materialises it, and every blob by its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from isal import igzip

from forgespace.errors import IntegrityError, UnsafeArchiveError
from forgespace.storage.pack import _GZIP_LEVEL, TREE_DIGEST_VERSION, _check_link, _record, _walk

MANIFEST_MAGIC = b"forgespace-manifest-v1\n"
FORMAT = "forgespace-manifest"
VERSION = 1
CODECS = ("raw", "z")  # blob bytes as they are, or one zlib stream
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A manifest larger than this is refused before it is inflated (a 20k-file tree is ~1.5 MB).
MAX_MANIFEST_JSON = 512 * 1024 * 1024
# Sizes and blob ranges past this are refused: no file or pack can hold them, and a larger
# offset cannot even be passed to seek.
MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A regular file: its path, executable bit, size, sha256 and where its blob is stored
    (``pack`` object, byte ``offset`` and ``length`` there, ``codec``)."""

    path: str
    executable: bool
    size: int
    sha256: str
    pack: str = ""
    offset: int = 0
    length: int = 0
    codec: str = "raw"


Entry = tuple[str, str] | tuple[str, str, str] | FileEntry


@dataclass(frozen=True)
class Manifest:
    """A directory's entries in walk order: ``("d", path)``, ``FileEntry``, ``("l", path,
    target)``; ``tree`` is its tree digest (the content id's source)."""

    tree: str
    entries: tuple[Entry, ...]

    @property
    def files(self) -> list[FileEntry]:
        """The regular files."""
        return [e for e in self.entries if isinstance(e, FileEntry)]


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts with the manifest magic (judged by content)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MANIFEST_MAGIC)) == MANIFEST_MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


@dataclass(frozen=True)
class TreeWalk:
    """A directory's entries in walk order, without reading any file: ``("d", path)``,
    ``("l", path, target)``, ``("f", path, absolute path)``; ``file_bytes``: the files'
    sizes when walked (for progress)."""

    entries: tuple[tuple[str, str] | tuple[str, str, str], ...]
    file_bytes: int


def walk_tree(src: str | Path) -> TreeWalk:
    """Walk the directory ``src`` (the order and rules of ``pack_directory``) reading no
    file. UnsafeArchiveError for links leaving the tree and for devices, fifos and sockets:
    a tree refused here costs no file read and no store request."""
    root = Path(src)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    entries: list[tuple[str, str] | tuple[str, str, str]] = []
    total = 0
    for rel, entry in _walk(root):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(entry.path)
            _check_link(rel, target)
            entries.append(("l", rel, target))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(("d", rel))
        elif stat.S_ISREG(st.st_mode):
            entries.append(("f", rel, entry.path))
            total += st.st_size
        else:
            raise UnsafeArchiveError(
                f"{rel!r} is a device, fifo or socket; only regular files, directories "
                "and symlinks can be uploaded"
            )
    return TreeWalk(tuple(entries), total)


def tree_digest(entries: tuple[Entry, ...] | list[Entry]) -> str:
    """The tree digest of manifest entries (the records ``pack_directory`` hashes: the same
    tree has the same digest in both layouts)."""
    tree = hashlib.sha256(TREE_DIGEST_VERSION)
    for e in entries:
        if isinstance(e, FileEntry):
            kind = "x" if e.executable else "f"
            tree.update(_record(kind, e.path, f"{e.size}:{e.sha256}"))
        elif e[0] == "l":
            tree.update(_record("l", e[1], e[2]))  # type: ignore[misc]
        else:
            tree.update(_record("d", e[1]))
    return tree.hexdigest()


def encode_manifest(m: Manifest) -> bytes:
    """The bytes stored as the target object."""
    rows: list[list[object]] = []
    for e in m.entries:
        if isinstance(e, FileEntry):
            rows.append(
                ["f", e.path, int(e.executable), e.size, e.sha256, e.pack, e.offset, e.length,
                 e.codec]
            )  # fmt: skip
        else:
            rows.append(list(e))
    doc = {"format": FORMAT, "version": VERSION, "tree": m.tree, "entries": rows}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # isal level 1: 20x faster than zlib level 6 on a 20,000-file manifest and no larger (its
    # bulk is hex digests, which no level compresses much).
    return MANIFEST_MAGIC + igzip.compress(raw, _GZIP_LEVEL, mtime=0)


def parse_manifest(data: bytes, what: str) -> Manifest:
    """Check and decode a manifest (untrusted); IntegrityError naming ``what`` and the fault."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{what} is not a valid forgespace manifest: {why}")

    if not data.startswith(MANIFEST_MAGIC):
        raise bad("it does not start with the manifest magic line")
    try:
        d = zlib.decompressobj(wbits=31)
        raw = d.decompress(data[len(MANIFEST_MAGIC) :], MAX_MANIFEST_JSON)
        if d.unconsumed_tail or not d.eof:
            raise bad("its compressed body is truncated or larger than the limit")
        doc = json.loads(raw)
    except (zlib.error, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise bad(f"its body cannot be decoded ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise bad(f"expected format {FORMAT!r} version {VERSION}")
    tree, rows = doc.get("tree"), doc.get("entries")
    if not isinstance(tree, str) or not isinstance(rows, list):
        raise bad("'tree' must be a string and 'entries' a list")
    entries = _well_formed(rows)
    if entries is None:  # something is wrong: find the first fault, row by row
        entries = tuple(_entry(r, i, what) for i, r in enumerate(rows))
    return Manifest(tree, entries)


def _well_formed(rows: list[object]) -> tuple[Entry, ...] | None:
    """The entries of ``rows`` when every row is well formed, else None (``_entry`` then
    names the first fault). The same rules as ``_entry``, checked with fewer calls per row
    and all digests and pack names at once (``_all_hex64``): a 20,000-file manifest is
    parsed on every cold get of its target."""
    out: list[Entry] = []
    hexes: list[str] = []
    for row in rows:
        if type(row) is not list:
            return None
        n = len(row)
        if n == 9 and row[0] == "f":
            _, path, exe, size, digest, pack, offset, length, codec = row
            if not (
                type(path) is str
                and type(exe) is int
                and type(size) is int
                and type(offset) is int
                and type(length) is int
                and type(digest) is str
                and type(pack) is str
                and len(digest) == 64
                and len(pack) == 64
                and exe >= 0
                and 0 <= size <= MAX_OFFSET
                and offset >= 0
                and length >= 0
                and offset + length <= MAX_OFFSET
                and (codec == "raw" or codec == "z")
            ):
                return None
            hexes.append(digest)
            hexes.append(pack)
            out.append(FileEntry(path, exe != 0, size, digest, pack, offset, length, codec))
        elif n == 2 and row[0] == "d" and type(row[1]) is str:
            out.append(("d", row[1]))
        elif n == 3 and row[0] == "l" and type(row[1]) is str and type(row[2]) is str:
            out.append(("l", row[1], row[2]))
        else:
            return None
    if not _all_hex64(hexes):
        return None
    return tuple(out)


def _all_hex64(strings: list[str]) -> bool:
    """Whether each of ``strings`` (each 64 characters long) is 64 lowercase hex digits, as
    ``_HEX64`` checks one: together they decode to one byte per two characters (no
    whitespace, nothing but ASCII hex digits) and none is upper case."""
    if not strings:
        return True
    joined = "".join(strings)
    try:
        decoded = bytes.fromhex(joined)
    except ValueError:
        return False
    return 2 * len(decoded) == len(joined) and (joined.islower() or joined.isdigit())


def _entry(row: object, i: int, what: str) -> tuple[str, str] | tuple[str, str, str] | FileEntry:
    # Checked field by field without generators: a 20,000-file manifest is parsed on every
    # cold get of its target.
    if type(row) is not list or not row:
        raise _bad_entry(what, i, "must be a list of strings and integers")
    for x in row:
        if not isinstance(x, (str, int)):
            raise _bad_entry(what, i, "must be a list of strings and integers")
    kind, n = row[0], len(row)
    if kind == "d" and n == 2 and type(row[1]) is str:
        return ("d", row[1])
    if kind == "l" and n == 3 and type(row[1]) is str and type(row[2]) is str:
        return ("l", row[1], row[2])
    if kind != "f" or n != 9:
        raise _bad_entry(what, i, "has an unknown kind or the wrong number of fields")
    _, path, exe, size, digest, pack, offset, length, codec = row
    if type(path) is not str or type(exe) is not int or exe < 0:
        raise _bad_entry(what, i, "needs a string path and non-negative integers")
    why = blob_problem(digest, pack, offset, length, codec, size)
    if why is not None:
        raise _bad_entry(what, i, why)
    return FileEntry(path, bool(exe), size, digest, pack, offset, length, str(codec))


def blob_problem(
    digest: object, pack: object, offset: object, length: object, codec: object, size: object
) -> str | None:
    """Why a blob's recorded location is not one (untrusted: a manifest's file entry or a
    pack index's row), or None when it is well formed."""
    for n in (size, offset, length):
        if type(n) is not int or n < 0:
            return "needs non-negative integers for its size, offset and length"
    assert isinstance(size, int) and isinstance(offset, int) and isinstance(length, int)
    if size > MAX_OFFSET or offset + length > MAX_OFFSET:
        return f"has a size or blob range beyond {MAX_OFFSET} bytes (a file offset's limit)"
    if type(digest) is not str or not _HEX64.fullmatch(digest):
        return "has a sha256 that is not 64 lowercase hex digits"
    if type(pack) is not str or not _HEX64.fullmatch(pack) or codec not in CODECS:
        return f"has a bad blob location (pack {pack!r}, codec {codec!r})"
    return None


def _bad_entry(what: str, i: int, why: str) -> IntegrityError:
    return IntegrityError(f"{what} is not a valid forgespace manifest: entry {i} {why}")


__all__ = [
    "MANIFEST_MAGIC",
    "FileEntry",
    "Manifest",
    "TreeWalk",
    "blob_problem",
    "encode_manifest",
    "is_manifest",
    "parse_manifest",
    "tree_digest",
    "walk_tree",
]
