"""Regenerate the seed corpora: ``fuzz_archive.py``'s in ``fuzz/corpus/archive/`` and
``fuzz_manifest.py``'s in ``fuzz/corpus/manifest/``.

Run ``.venv/bin/python fuzz/make_corpus.py [archive|manifest]`` from the repository root (both
when none is named). Seeds are small and deterministic (fixed mtimes, compressors without
timestamps), so regenerating them gives the same bytes; inputs the fuzzer found and that were
committed (named by their sha1, as libFuzzer names them) are kept. Two kinds of archive seeds:

- real archives: a small project as tar in GNU, pax and ustar formats, plain and gzip/bzip2/xz,
  zip stored/deflated/bzip2/lzma/zip64, long and unicode names, hard and symbolic links, global
  pax headers, base-256 numbers, pre-POSIX directories, an empty tar;
- every malicious kind ``tests/unit/test_archive_corpus.py`` knows, built by its own builders
  (the sentinel they aim at is ``../outside``, the harness's sibling of the destination), plus a
  few refusals only a crafted header reaches (sparse, encrypted zip member, sockets, a chain of
  links that escapes only past PATH_MAX).

Manifest seeds name the blobs of the pack ``_manifest_store.make_store`` builds (the pack the
harness holds): valid manifests (files, directories, links, executable bits, empty files) and
hostile ones (escaping, absolute and ``..`` paths, links out, link chains, a file through a
link, duplicate paths, huge sizes, wrong digests and blob locations, bad JSON, bad gzip, wrong
magic), plus packs as a store returns them (the real one, truncated, corrupted) and its index.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import re
import stat
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "corpus" / "archive"
OUT_MANIFEST = HERE / "corpus" / "manifest"
#: the name libFuzzer gives an input it found (its sha1): kept when the seeds are regenerated
_FOUND = re.compile(r"[0-9a-f]{40}")
sys.path.insert(0, str(HERE.parent / "tests" / "unit"))

from _manifest_store import make_store  # noqa: E402
from test_archive_corpus import (  # noqa: E402 (the test module is the one home of the builders)
    CORPUS,
    TarMember,
    _dir,
    _file,
    _hard,
    _sym,
    _tinfo,
)

from forgespace.storage.blobs import INDEX, PACKS  # noqa: E402
from forgespace.storage.manifest import (  # noqa: E402
    MANIFEST_MAGIC,
    FileEntry,
    Manifest,
    encode_manifest,
)

MTIME = 1_600_000_000
ZIP_TIME = (2020, 9, 13, 12, 26, 40)


def trim_tar(data: bytes) -> bytes:
    """Drop tarfile's padding to a 10 KiB record: keep the members and the two end blocks, so
    the fuzzer does not spend its mutations on kilobytes of zeros. (No seed member ends with a
    whole block of zeros, so rounding the stripped length up to a block restores every member.)"""
    end = -(-len(data.rstrip(b"\0")) // 512) * 512
    return data[:end] + bytes(1024)


def tar_bytes(
    members: list[TarMember], fmt: int = tarfile.GNU_FORMAT, pax: dict[str, str] | None = None
) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt, pax_headers=pax or {}) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return trim_tar(raw.getvalue())


def zip_bytes(
    members: list[tuple[str, int, bytes]],
    compression: int = zipfile.ZIP_DEFLATED,
    *,
    zip64: bool = False,
    extra: bytes = b"",
) -> bytes:
    """members: (name, unix st_mode incl. file type, data)."""
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression) as zf:
        for name, st_mode, data in members:
            zi = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            zi.create_system = 3
            zi.external_attr = (st_mode & 0xFFFF) << 16
            zi.compress_type = compression
            zi.extra = extra
            with zf.open(zi, "w", force_zip64=zip64) as f:
                f.write(data)
    return raw.getvalue()


def project() -> list[TarMember]:
    """A small source tree: nested dirs, an executable, an empty file, a read-only directory,
    links inside, a hard link."""
    return [
        _dir("src"),
        _dir("src/pkg"),
        _file("src/pkg/mod.py", b"print('hello')\n" * 20),
        _file("src/pkg/data.bin", bytes(range(256)) * 4),
        _file("run.sh", b"#!/bin/sh\necho run\n", mode=0o755),
        _file("empty.txt", b""),
        _dir("emptydir"),
        _dir("ro", mode=0o555),
        _file("ro/inside.txt", b"read-only dir content\n"),
        _sym("link-to-mod", "src/pkg/mod.py"),
        _sym("src/up-link", "../run.sh"),
        _hard("hard-mod", "src/pkg/mod.py"),
    ]


def long_names() -> list[TarMember]:
    deep = "/".join(f"directory-level-{i:02d}" for i in range(7))  # > 100 chars, < 155 prefix
    return [
        _file("directory-level-00/file.txt", b"top"),
        _file(f"{deep}/file.txt", b"deep"),
        _sym(f"{deep}/link", "../" * 6 + "file.txt"),
        _file("unicodé-ñame-" + "x" * 120, b"u"),
        _hard("h" * 150, f"{deep}/file.txt"),
    ]


def odd_tar_members() -> list[TarMember]:
    """Header forms the walker handles on its own paths."""
    slash_dir = _tinfo("old-style-dir/", tarfile.REGTYPE)  # pre-POSIX: a dir marked by a slash
    contiguous = _tinfo("contiguous", tarfile.CONTTYPE, size=3)
    negative = _tinfo("before-1970", size=2)
    negative.mtime = -86_400  # written in GNU base-256
    return [
        (slash_dir, b""),
        (contiguous, b"abc"),
        (negative, b"ok"),
        _file("dup", b"first"),
        _file("dup", b"second replaces first"),
    ]


def replacements() -> list[TarMember]:
    """Later members replacing earlier ones of every kind (the last one wins, never followed)."""
    return [
        _file("a", b"first"),
        _file("b", b"second"),
        _sym("x", "a"),
        _file("x", b"a file replaces the link"),
        _hard("h", "a"),
        _hard("h", "b"),
        _sym("h", "b"),
        _hard("a", "a"),
        _dir("d"),
        _file("d/f", b"in d"),
    ]


def pax_extras() -> bytes:
    frac = _tinfo("fractional-mtime", size=1)
    frac.mtime = 1_600_000_000.5  # type: ignore[assignment]
    frac.pax_headers = {"comment": "pax record the walker ignores"}
    return tar_bytes(
        [(frac, b"x"), *long_names()], tarfile.PAX_FORMAT, pax={"comment": "global header"}
    )


def sparse() -> bytes:
    ti = _tinfo("sparse", size=4)
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.size": "9"}
    return tar_bytes([(ti, b"data")], tarfile.PAX_FORMAT)


def deep_tree() -> bytes:
    # 200 levels: deep enough to exercise long pax paths, far from recursion or PATH_MAX limits.
    deep = "/".join(["d"] * 200)
    return tar_bytes([_file(f"{deep}/leaf", b"leaf"), _sym("top", deep)], tarfile.PAX_FORMAT)


def deep_symlink_chain() -> bytes:
    """The escape the fuzz work found (tests/unit/test_archive_fuzz_regressions.py): a link
    ``deep/s -> ..`` where ``dest/deep`` is longer than PATH_MAX, and a top-level link through it
    that climbs out. The harness's destination name is long enough for this to matter."""
    n = 16
    deep = "/".join(f"p{i:02d}" + "x" * 240 for i in range(n))
    target = f"{deep}/s/" + "/".join([".."] * (n + 1))
    return tar_bytes(
        [
            _dir(deep),
            _sym(f"{deep}/s", ".."),
            _sym("l", target),
        ],
        tarfile.PAX_FORMAT,
    )


def ext_timestamp() -> bytes:
    # Extended-timestamp extra field (0x5455): flags=1 (mtime present), mtime as int32 LE.
    extra = b"UT" + (5).to_bytes(2, "little") + b"\x01" + MTIME.to_bytes(4, "little")
    return zip_bytes([("stamped.txt", 0o100644, b"utc mtime")], extra=extra)


def encrypted_zip() -> bytes:
    raw = bytearray(zip_bytes([("secret.txt", 0o100644, b"not really encrypted")]))
    # Set general-purpose flag bit 0 (encrypted) in the local and central headers.
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.find(sig)
        raw[i + off] |= 1
    return bytes(raw)


def project_zip(compression: int, *, zip64: bool = False) -> bytes:
    members: list[tuple[str, int, bytes]] = [
        ("src/", stat.S_IFDIR | 0o755, b""),
        ("src/pkg/mod.py", 0o100644, b"print('hello')\n" * 20),
        ("run.sh", 0o100755, b"#!/bin/sh\necho run\n"),
        ("empty.txt", 0o100644, b""),
        ("link-to-mod", stat.S_IFLNK | 0o777, b"src/pkg/mod.py"),
        ("plain-dir/", 0, b""),  # no unix mode: a directory by its trailing slash
    ]
    return zip_bytes(members, compression, zip64=zip64)


REAL: dict[str, Callable[[], bytes]] = {
    "project-gnu.tar": lambda: tar_bytes(project()),
    "project-pax.tar": lambda: tar_bytes(project(), tarfile.PAX_FORMAT),
    "project-ustar.tar": lambda: tar_bytes(project(), tarfile.USTAR_FORMAT),
    "project.tar.gz": lambda: gzip.compress(tar_bytes(project()), 9, mtime=0),
    "project.tar.bz2": lambda: bz2.compress(tar_bytes(project()), 9),
    "project.tar.xz": lambda: lzma.compress(tar_bytes(project())),
    "long-names-gnu.tar.gz": lambda: gzip.compress(tar_bytes(long_names()), 9, mtime=0),
    "long-names-ustar-prefix.tar": lambda: tar_bytes(long_names()[:3], tarfile.USTAR_FORMAT),
    "pax-extras.tar.xz": lambda: lzma.compress(pax_extras()),
    "odd-headers-gnu.tar": lambda: tar_bytes(odd_tar_members()),
    "replacements-gnu.tar": lambda: tar_bytes(replacements()),
    "deep-pax.tar.gz": lambda: gzip.compress(deep_tree(), 9, mtime=0),
    "empty.tar": lambda: bytes(1024),
    "project-deflated.zip": lambda: project_zip(zipfile.ZIP_DEFLATED),
    "project-stored.zip": lambda: project_zip(zipfile.ZIP_STORED),
    "project-bzip2.zip": lambda: project_zip(zipfile.ZIP_BZIP2),
    "project-lzma.zip": lambda: project_zip(zipfile.ZIP_LZMA),
    "project-zip64.zip": lambda: project_zip(zipfile.ZIP_DEFLATED, zip64=True),
    "ext-timestamp.zip": ext_timestamp,
}

# The tests' bombs inflate to 20 MB (~20 kB each); the harness's limit is 64 KiB, so 1 MB of
# zeros is as much a bomb and keeps seeds (and libFuzzer's default -max_len) small.
SMALL_BOMBS: dict[str, Callable[[], bytes]] = {
    "tgz_compressed_bomb": lambda: gzip.compress(
        tar_bytes([_file("zeros", bytes(1 << 20))]), 9, mtime=0
    ),
    "zip_bomb": lambda: zip_bytes([("zeros", 0o100644, bytes(1 << 20))]),
}

CRAFTED: dict[str, Callable[[], bytes]] = {
    "tar_sparse.tar": sparse,
    "tar_symlink_chain_deep.tar.gz": lambda: gzip.compress(deep_symlink_chain(), 9, mtime=0),
    "zip_encrypted.zip": encrypted_zip,
    "zip_socket.zip": lambda: zip_bytes([("sock", stat.S_IFSOCK | 0o644, b"")]),
}


def manifest_seeds(tmp: Path) -> dict[str, bytes]:
    """Manifests over the harness's pack, valid and hostile, and packs as a store returns them."""
    store, real = make_store(tmp)
    f = {e.path: e for e in real.files}
    a, mod, empty = f["a.txt"], f["sub/mod.py"], f["empty"]

    def as_file(path: str, src: FileEntry = a, **change: object) -> FileEntry:
        return dataclasses.replace(src, path=path, **change)  # type: ignore[arg-type]

    def doc(*entries: object) -> bytes:
        return encode_manifest(Manifest("x", tuple(entries)))  # type: ignore[arg-type]

    def raw_doc(body: bytes) -> bytes:
        return MANIFEST_MAGIC + gzip.compress(body, 6, mtime=0)

    real_doc = json.loads(gzip.decompress(encode_manifest(real)[len(MANIFEST_MAGIC) :]))
    pack = store.blob_get(PACKS + a.pack)
    z = mod.offset + mod.length // 2  # a byte inside the zlib-compressed blob
    return {
        # valid
        "tree.manifest": encode_manifest(real),
        "empty-tree.manifest": doc(),
        "exec-and-empty.manifest": doc(f["run.sh"], empty, as_file("copy", mod)),
        "dirs-and-links.manifest": doc(
            ("d", "d"), ("d", "d/e"), ("l", "d/e/up", "../../a"), a, ("l", "d/rel", "e/up")
        ),
        "same-blob-twice.manifest": doc(a, as_file("b.txt"), as_file("sub/c.txt")),
        "read-through-link.manifest": doc(("d", "real"), ("l", "alias", "real"), a),
        # hostile paths and links
        "escaping-path.manifest": doc(as_file("../outside/secret")),
        "absolute-path.manifest": doc(as_file("/outside/secret")),
        "dotdot-inside.manifest": doc(("d", "a"), as_file("a/../../outside/x")),
        "link-out.manifest": doc(("l", "out", "../outside")),
        "link-absolute.manifest": doc(("l", "out", "/outside/secret")),
        "link-chain.manifest": doc(("d", "b"), ("l", "b/up", ".."), ("l", "c", "b/up/..")),
        "file-through-link.manifest": doc(("l", "x", "."), as_file("x/a.txt")),
        "file-through-link-out.manifest": doc(("l", "x", "../outside"), as_file("x/secret")),
        "dir-through-link.manifest": doc(("l", "x", "."), ("d", "x/d")),
        "dup-file.manifest": doc(a, as_file("a.txt", mod)),
        "dup-file-then-dir.manifest": doc(a, ("d", "a.txt"), as_file("a.txt/b")),
        "dup-dir-then-link.manifest": doc(("d", "d"), ("l", "d", "../outside"), as_file("d/x")),
        "dup-link-then-file.manifest": doc(("l", "l", "../outside/secret"), as_file("l")),
        "empty-and-dot-names.manifest": doc(("d", ""), ("d", "."), as_file("./a//b")),
        "nul-in-name.manifest": doc(as_file("a\0b")),
        # hostile sizes, digests and blob locations
        "huge-size.manifest": doc(as_file("big", size=10**15)),
        "many-copies.manifest": doc(*(as_file(f"c{i}", mod) for i in range(80))),
        "wrong-digest.manifest": doc(as_file("a.txt", sha256=mod.sha256)),
        "wrong-size.manifest": doc(as_file("a.txt", size=a.size + 1)),
        "zero-size-real-digest.manifest": doc(as_file("a.txt", size=0)),
        "wrong-codec.manifest": doc(as_file("m", mod, codec="raw")),
        "raw-as-zlib.manifest": doc(as_file("a.txt", codec="z")),
        "offset-past-end.manifest": doc(as_file("a.txt", offset=len(pack) + 10)),
        "overlapping-blobs.manifest": doc(as_file("x", mod, offset=mod.offset - 3)),
        "missing-pack.manifest": doc(as_file("a.txt", pack="2" * 64)),
        # the build finishes from the first pack's copy of a blob, then the fetch of the same
        # digest from a missing pack fails (found by the fuzzer: the built tree was left)
        "same-blob-second-pack-missing.manifest": doc(
            a, as_file("b.txt"), as_file("sub/c.txt", pack="3" * 64)
        ),
        "offset-beyond-seek.manifest": doc(as_file("a.txt", offset=10 * 2**63)),
        # not a valid manifest
        "bad-json.manifest": raw_doc(b'{"format": "forgespace-manifest", "version": 1, "tr'),
        "deep-json.manifest": raw_doc(b"[" * 100_000),
        "wrong-version.manifest": raw_doc(json.dumps({**real_doc, "version": 2}).encode()),
        "bad-entry-types.manifest": raw_doc(
            json.dumps({**real_doc, "entries": [["f", "a", 1.5, -1, "x", "y", 0, 0, "q"]]}).encode()
        ),
        "bad-gzip.manifest": MANIFEST_MAGIC + b"\x1f\x8b\x08\x00not gzip at all",
        "truncated-gzip.manifest": encode_manifest(real)[:-9],
        "wrong-magic.manifest": b"forgespace-manifest-v2\n" + encode_manifest(real)[23:],
        # packs (any input without the magic), and the pack's index
        "pack-real.bin": pack,
        "pack-truncated.bin": pack[: mod.offset + 4],
        "pack-corrupt-zlib.bin": pack[:z] + bytes([pack[z] ^ 0xFF]) + pack[z + 1 :],
        "pack-corrupt-raw.bin": pack[: a.offset] + b"A" + pack[a.offset + 1 :],
        "index-real.bin": store.blob_get(INDEX + a.pack),
        "index-deep-json.bin": gzip.compress(b"[" * 100_000, 6, mtime=0),
        "index-bad-deflate.bin": bytes.fromhex("1f8b08000000000000030105000000"),
    }


def main(which: list[str]) -> None:
    """Regenerate the corpora named (``archive``, ``manifest``; both when none is named)."""
    which = which or ["archive", "manifest"]
    if "manifest" in which:
        _reset(OUT_MANIFEST)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in manifest_seeds(Path(tmp)).items():
                (OUT_MANIFEST / name).write_bytes(data)
    if "archive" in which:
        archive_seeds()
    for kind, out in (("archive", OUT), ("manifest", OUT_MANIFEST)):
        if kind in which:
            files = sorted(out.iterdir())
            total = sum(p.stat().st_size for p in files)
            print(f"{len(files)} seeds, {total} bytes in {out.relative_to(HERE.parent)}")


def _reset(out: Path) -> None:
    """Remove the generated seeds of ``out`` (they are written again) but keep the inputs the
    fuzzer found and that were committed: libFuzzer names those by the sha1 of their bytes."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if not _FOUND.fullmatch(p.name):
            p.unlink()


def archive_seeds() -> None:
    _reset(OUT)
    for name, make in {**REAL, **CRAFTED}.items():
        (OUT / name).write_bytes(make())
    # The malicious kinds the unit tests know, from their own builders; "outside" is what the
    # harness keeps beside the destination (absolute names are refused before any write).
    with tempfile.TemporaryDirectory() as tmp:
        for kind, build in CORPUS.items():
            if kind in SMALL_BOMBS:
                data = SMALL_BOMBS[kind]()
            else:
                data = build(Path(tmp) / "a", Path("/outside")).read_bytes()
            if data.startswith(b"\x1f\x8b"):
                # tarfile's "w:gz" stamps the current time: re-stamp for repeatable bytes.
                data = gzip.compress(trim_tar(gzip.decompress(data)), 9, mtime=0)
            elif not kind.startswith("zip"):
                data = trim_tar(data)
            (OUT / f"{kind}.{'zip' if kind.startswith('zip') else 'bin'}").write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1:])
