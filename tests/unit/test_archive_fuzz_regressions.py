"""Inputs the archive fuzzer (fuzz/fuzz_archive.py) found crashing the reader, each rebuilt here
in its smallest form: every one must end in the documented error naming the archive, with
nothing left behind, instead of a raw exception from the zip/bz2 layers underneath."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from forgespace.cache.archive import detect_archive, extract_archive
from forgespace.errors import IntegrityError, UnsafeArchiveError

MAX = 1_000_000


def _zip(path: Path, name: str, data: bytes, st_mode: int, compression: int) -> bytes:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zi = zipfile.ZipInfo(name, date_time=(2020, 9, 13, 12, 0, 0))
        zi.create_system = 3
        zi.external_attr = st_mode << 16
        zi.compress_type = compression
        zf.writestr(zi, data)
    return path.read_bytes()


def _refused(archive: Path, tmp_path: Path, match: str) -> IntegrityError:
    assert detect_archive(archive) == "zip"
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=match) as info:
        extract_archive(archive, dest, max_bytes=MAX)
    assert str(archive) in str(info.value)
    assert not dest.exists()
    return info.value


def test_zip_needing_a_newer_zip_version_is_an_integrity_error(tmp_path: Path) -> None:
    """zipfile refuses "version needed to extract" above 6.3 with NotImplementedError."""
    archive = tmp_path / "a.zip"
    raw = bytearray(_zip(archive, "f.txt", b"data", 0o100644, zipfile.ZIP_DEFLATED))
    central = raw.find(b"PK\x01\x02")
    raw[central + 6] = 97  # version needed to extract: 9.7
    archive.write_bytes(raw)
    _refused(archive, tmp_path, r"not a readable zip archive: zip file version 9\.7")


@pytest.mark.parametrize(
    "st_mode", [0o100644, stat.S_IFLNK | 0o777], ids=["regular-file", "symlink"]
)
def test_zip_member_with_a_corrupt_bzip2_stream_is_an_integrity_error(
    tmp_path: Path, st_mode: int
) -> None:
    """bz2 reports a damaged stream as a bare OSError (no errno), in a file or a symlink member."""
    archive = tmp_path / "a.zip"
    raw = _zip(archive, "member", b"target-or-content" * 8, st_mode, zipfile.ZIP_BZIP2)
    start = raw.index(b"BZh9") + 4
    archive.write_bytes(raw[:start] + bytes(16) + raw[start + 16 :])
    _refused(archive, tmp_path, r"member 'member' is corrupt or truncated .*Invalid data stream")


def test_zip_local_name_that_is_not_utf8_is_an_integrity_error(tmp_path: Path) -> None:
    """The central directory says UTF-8 names; the local header's copy of the name is not UTF-8.
    zipfile decodes it when the member is opened, raising UnicodeDecodeError."""
    archive = tmp_path / "a.zip"
    raw = _zip(archive, "é.txt", b"data", 0o100644, zipfile.ZIP_STORED)
    local_name = raw.index("é".encode(), raw.index(b"PK\x03\x04"))
    archive.write_bytes(raw[:local_name] + b"\xc3\x28" + raw[local_name + 2 :])
    _refused(archive, tmp_path, r"member 'é\.txt' is corrupt")


def test_symlink_chain_escaping_below_path_max_depth_is_refused(tmp_path: Path) -> None:
    """Found while writing the harness's own containment oracle (kernel resolution, one
    directory fd at a time): the extractor judged chains of links with ``realpath``, which treats
    every component of an absolute path longer than PATH_MAX as a plain directory. A link
    ``deep/s -> ..`` placed where ``dest/deep`` exceeds PATH_MAX, and a top-level link through
    it, passed the check yet resolve two levels above the destination."""
    parent = tmp_path / ("c" * 200)
    parent.mkdir()
    dest = parent / "dest"
    n = 16
    deep = "/".join(f"p{i:02d}" + "x" * 240 for i in range(n))
    target = f"{deep}/s/" + "/".join([".."] * (n + 1))
    assert len(f"{dest}/{deep}") >= 4096 > len(target)  # beyond PATH_MAX only when absolute
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, type_, link in [
            (deep, tarfile.DIRTYPE, ""),
            (f"{deep}/s", tarfile.SYMTYPE, ".."),
            ("l", tarfile.SYMTYPE, target),
        ]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode = type_, link, 0o755
            tf.addfile(ti)
    why = r"member 'l' is a symlink that resolves outside the destination through the symlink"
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_archive(archive, dest, max_bytes=MAX)
    assert not dest.exists()
    assert sorted(os.listdir(parent)) == []


def test_link_chains_that_stay_inside_and_loops_still_extract(tmp_path: Path) -> None:
    """The resolver that replaced realpath refuses only what leaves: a chain through ``..``
    that lands inside, a dangling link and a loop (which the kernel refuses to follow) are kept."""
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, type_, link in [
            ("d", tarfile.DIRTYPE, ""),
            ("d/s", tarfile.SYMTYPE, ".."),
            ("inside", tarfile.SYMTYPE, "d/s/d/s/d"),
            ("dangling", tarfile.SYMTYPE, "d/not-yet"),
            ("loop-a", tarfile.SYMTYPE, "loop-b"),
            ("loop-b", tarfile.SYMTYPE, "loop-a/x/../.."),
        ]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode = type_, link, 0o755
            tf.addfile(ti)
    dest = tmp_path / "dest"
    extract_archive(archive, dest, max_bytes=MAX)
    assert (dest / "inside").resolve() == (dest / "d").resolve()
    assert os.readlink(dest / "loop-b") == "loop-a/x/../.."
