"""Hostile headers, built byte by byte: what a crafted tar or zip claims in its headers is
refused with the documented error naming the archive, before anything it describes is
written, and nothing is left behind."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from forgespace.cache.archive import detect_archive, extract_archive
from forgespace.errors import IntegrityError, UnsafeArchiveError

MAX = 1 << 20  # extraction limit of these tests: 1 MiB


def header(
    name: bytes = b"f",
    size: int = 0,
    typeflag: bytes = b"0",
    *,
    size_field: bytes | None = None,
) -> bytes:
    """One ustar header block with a valid checksum."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"%011o\0" % 1_600_000_000
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def tar_bytes(*blocks: bytes) -> bytes:
    return b"".join(blocks) + b"\0" * 1024


def extract(tmp_path: Path, data: bytes, name: str = "a.tar") -> Path:
    archive = tmp_path / name
    archive.write_bytes(data)
    extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    return tmp_path / "dest"


def refused(tmp_path: Path, data: bytes, error: type[Exception], match: str) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    assert detect_archive(archive) in ("tar", "zip")
    with pytest.raises(error, match=match) as info:
        extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    assert str(archive) in str(info.value)
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_the_helpers_make_archives_tarfile_reads(tmp_path: Path) -> None:
    """Control: the hand-made blocks are a valid archive; only the hostile fields differ."""
    data = tar_bytes(
        header(b"x", typeflag=b"x", size=len(pax_record("path", "named.txt"))),
        padded(pax_record("path", "named.txt")),
        header(b"f", size=5),
        padded(b"hello"),
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["named.txt"]
    assert (extract(tmp_path, data) / "named.txt").read_bytes() == b"hello"


@pytest.mark.parametrize(
    "records",
    [
        b"abc path=x\n",  # the length is not a number
        b"99 path=x\n",  # the record runs past the data
        b"0 path=x\n",  # a zero length
        b"11 pathx=\n\n"[:-1] + b"y",  # no newline where the length ends
        b"10 pathxy\n",  # no '='
        b"nospace",  # no length separator at all
    ],
    ids=["not-a-number", "past-the-end", "zero-length", "no-newline", "no-equals", "no-space"],
)
def test_invalid_pax_records_are_corruption(tmp_path: Path, records: bytes) -> None:
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(records)),
        padded(records),
        header(b"f", size=1),
        padded(b"x"),
    )
    refused(tmp_path, data, IntegrityError, "invalid pax record")


def test_a_negative_base256_size_is_corruption(tmp_path: Path) -> None:
    minus_one = b"\xff" * 12  # GNU base-256, two's complement: -1
    refused(tmp_path, tar_bytes(header(size_field=minus_one)), IntegrityError, "negative size -1")


def test_a_negative_pax_size_is_corruption(tmp_path: Path) -> None:
    rec = pax_record("size", "-5")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f"))
    refused(tmp_path, data, IntegrityError, "negative size -5")


def test_a_pax_size_that_is_not_a_number_is_corruption(tmp_path: Path) -> None:
    rec = pax_record("size", "12abc")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f"))
    refused(tmp_path, data, IntegrityError, "invalid pax size or mtime")


def test_a_size_field_that_is_not_octal_is_corruption(tmp_path: Path) -> None:
    data = tar_bytes(header(size_field=b"00000000009\0"))
    refused(tmp_path, data, IntegrityError, "invalid size field")


def test_a_nul_in_a_pax_path_is_refused(tmp_path: Path) -> None:
    rec = pax_record("path", "ok\0../../etc/passwd")
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f", 1), padded(b"x")
    )
    refused(tmp_path, data, UnsafeArchiveError, "NUL byte")


def test_a_nul_in_a_pax_link_target_is_refused(tmp_path: Path) -> None:
    rec = pax_record("linkpath", "ok\0/etc/passwd")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"l", 0, b"2"))
    refused(tmp_path, data, UnsafeArchiveError, "symlink whose target contains a NUL byte")


# --- sizes claimed in headers: refused from the header, before the data is written --------


def test_a_tar_member_claiming_more_than_the_limit_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    """The data that follows is 2 MiB; the header claims 1 GiB: refused by what it claims,
    not after 1 MiB of it was written."""
    data = tar_bytes(header(b"bomb", size=1 << 30), b"\0" * (2 << 20))
    refused(tmp_path, data, UnsafeArchiveError, f"extracted size to {1 << 30} bytes")


def test_a_pax_size_claiming_more_than_the_limit_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    rec = pax_record("size", str(1 << 40))
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"bomb"), b"\0" * 4096
    )
    refused(tmp_path, data, UnsafeArchiveError, f"extracted size to {1 << 40} bytes")


def test_members_each_within_the_limit_are_refused_together(tmp_path: Path) -> None:
    """Three members of 400 KiB: each fits in 1 MiB, the three do not."""
    chunk = 400 << 10
    data = tar_bytes(*(header(b"m%d" % i, chunk) + padded(b"z" * chunk) for i in range(3)))
    refused(tmp_path, data, UnsafeArchiveError, f"extracted size to {3 * chunk} bytes")


def test_a_zip_bomb_is_refused_from_its_declared_size(tmp_path: Path) -> None:
    """2 MiB of zeros deflate to a few KiB: refused from the central directory's size before
    a byte is inflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * (2 << 20))
    assert len(buf.getvalue()) < 16 << 10
    refused(tmp_path, buf.getvalue(), UnsafeArchiveError, f"extracted size to {2 << 20} bytes")


def test_an_encrypted_zip_member_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("secret", b"ciphertext would be here")
    data = bytearray(buf.getvalue())
    # Set the "encrypted" bit of the general purpose flags in the local and central headers.
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(sig) + offset
        (flags,) = struct.unpack_from("<H", data, at)
        struct.pack_into("<H", data, at, flags | 0x1)
    refused(tmp_path, bytes(data), UnsafeArchiveError, "encrypted zip members are not supported")
