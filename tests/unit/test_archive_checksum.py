"""One tar header checksum test serves detection and extraction: a header whose checksum
does not match is refused as corrupt, and nothing is left behind."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from forgespace.cache.archive import extract_archive
from forgespace.errors import CorruptArchiveError


def _tar(path: Path, *, second_header: bytes | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(buf.getvalue())
    if second_header is not None:  # the second member's header starts at block 2
        data[1024 : 1024 + len(second_header)] = second_header
    path.write_bytes(bytes(data))


def test_a_valid_tar_extracts(tmp_path: Path) -> None:
    _tar(tmp_path / "ok.tar")
    extract_archive(tmp_path / "ok.tar", tmp_path / "out", max_bytes=1 << 20)
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"abc"


def test_a_header_with_a_wrong_checksum_is_corrupt(tmp_path: Path) -> None:
    _tar(tmp_path / "bad.tar", second_header=b"c.txt")  # renamed, checksum not updated
    with pytest.raises(CorruptArchiveError, match="bad checksum"):
        extract_archive(tmp_path / "bad.tar", tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()
