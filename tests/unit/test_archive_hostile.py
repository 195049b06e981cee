"""Hostile headers, built byte by byte: what a crafted tar or zip claims in its headers is
refused with the documented error naming the archive, before anything it describes is
written, and nothing is left behind."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
import time
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


def refused(tmp_path: Path, data: bytes, error: type[Exception], reason: str) -> None:
    """``data`` is refused with ``error`` whose whole reason is ``reason`` (not a substring:
    a refusal says exactly which rule and why), naming the archive, leaving nothing."""
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    assert detect_archive(archive) in ("tar", "zip")
    with pytest.raises(error) as info:
        extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    assert info.value.reason == reason  # type: ignore[attr-defined]
    assert info.value.archive == str(archive)  # type: ignore[attr-defined]
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def over_the_limit(total: int) -> str:
    """The refusal of a member whose size takes the extraction to ``total`` bytes."""
    return (
        f"would take the extracted size to {total} bytes, above the limit of {MAX} bytes"
        " (CACHE_MAX_SIZE)"
    )


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
    refused(tmp_path, data, IntegrityError, "is corrupt: invalid pax record")


def test_a_negative_base256_size_is_corruption(tmp_path: Path) -> None:
    minus_one = b"\xff" * 12  # GNU base-256, two's complement: -1
    data = tar_bytes(header(size_field=minus_one))
    refused(tmp_path, data, IntegrityError, "is corrupt: negative size -1")


def test_a_negative_pax_size_is_corruption(tmp_path: Path) -> None:
    rec = pax_record("size", "-5")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f"))
    refused(tmp_path, data, IntegrityError, "is corrupt: negative size -5")


def test_a_pax_size_that_is_not_a_number_is_corruption(tmp_path: Path) -> None:
    rec = pax_record("size", "12abc")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f"))
    refused(tmp_path, data, IntegrityError, "is corrupt: invalid pax size or mtime")


def test_a_size_field_that_is_not_octal_is_corruption(tmp_path: Path) -> None:
    data = tar_bytes(header(size_field=b"00000000009\0"))
    why = "is corrupt: invalid size field b'00000000009\\x00'"
    refused(tmp_path, data, IntegrityError, why)


def test_a_nul_in_a_pax_path_is_refused(tmp_path: Path) -> None:
    rec = pax_record("path", "ok\0../../etc/passwd")
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"f", 1), padded(b"x")
    )
    refused(tmp_path, data, UnsafeArchiveError, "contains a NUL byte")


def test_a_nul_in_a_pax_link_target_is_refused(tmp_path: Path) -> None:
    rec = pax_record("linkpath", "ok\0/etc/passwd")
    data = tar_bytes(header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"l", 0, b"2"))
    refused(tmp_path, data, UnsafeArchiveError, "is a symlink whose target contains a NUL byte")


# --- sizes claimed in headers: refused from the header, before the data is written --------


def test_a_tar_member_claiming_more_than_the_limit_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    """The data that follows is 2 MiB; the header claims 1 GiB: refused by what it claims,
    not after 1 MiB of it was written."""
    data = tar_bytes(header(b"bomb", size=1 << 30), b"\0" * (2 << 20))
    refused(tmp_path, data, UnsafeArchiveError, over_the_limit(1 << 30))


def test_a_pax_size_claiming_more_than_the_limit_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    rec = pax_record("size", str(1 << 40))
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(rec)), padded(rec), header(b"bomb"), b"\0" * 4096
    )
    refused(tmp_path, data, UnsafeArchiveError, over_the_limit(1 << 40))


def test_members_each_within_the_limit_are_refused_together(tmp_path: Path) -> None:
    """Three members of 400 KiB: each fits in 1 MiB, the three do not."""
    chunk = 400 << 10
    data = tar_bytes(*(header(b"m%d" % i, chunk) + padded(b"z" * chunk) for i in range(3)))
    refused(tmp_path, data, UnsafeArchiveError, over_the_limit(3 * chunk))


def test_a_zip_bomb_is_refused_from_its_declared_size(tmp_path: Path) -> None:
    """2 MiB of zeros deflate to a few KiB: refused from the central directory's size before
    a byte is inflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * (2 << 20))
    assert len(buf.getvalue()) < 16 << 10
    refused(tmp_path, buf.getvalue(), UnsafeArchiveError, over_the_limit(2 << 20))


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
    why = "is encrypted; encrypted zip members are not supported"
    refused(tmp_path, bytes(data), UnsafeArchiveError, why)


# --- pax records, metadata sizes and header fields at their edges ----------------------------


def raw_pax_record(key: bytes, value: bytes) -> bytes:
    """A pax record of arbitrary bytes (pax_record's for names that are not UTF-8)."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_pax_records_are_read_like_gnu_tar(tmp_path: Path) -> None:
    """Several records in one header, a path with a space, an '=' and a byte that is not UTF-8,
    and a vendor keyword (not UTF-8 either) that is ignored: the same tree as GNU tar's."""
    name = b"with space/a=b/caf\xe9"
    records = (
        raw_pax_record(b"VENDOR.note\xff", b"ignored")
        + pax_record("mtime", "1500000000")
        + raw_pax_record(b"path", name)
    )
    data = tar_bytes(
        header(b"p", typeflag=b"x", size=len(records)),
        padded(records),
        header(b"placeholder", size=5),
        padded(b"hello"),
    )
    dest = extract(tmp_path, data)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-C", gnu, "-xf", tmp_path / "a.tar"], check=True, capture_output=True)
    for root in (dest, gnu):
        f = os.path.join(os.fsencode(root), name)
        assert Path(os.fsdecode(f)).read_bytes() == b"hello"
        assert os.stat(f).st_mtime_ns == 1_500_000_000 * 10**9
        assert os.listdir(os.fsencode(root)) == [b"with space"]


def test_a_pax_header_of_exactly_the_metadata_limit_is_read(tmp_path: Path) -> None:
    """1 MiB of pax records is accepted (the limit is inclusive; a multiple of the block size,
    so no padding follows it); one byte more is refused."""
    limit = 1 << 20
    rec_path = pax_record("path", "named.txt")
    room = limit - len(rec_path)  # the comment record's length, digits included
    filler = pax_record("comment", "x" * (room - len(str(room)) - len(" comment=\n")))
    records = filler + rec_path
    assert len(records) == limit
    member = header(b"f", size=2) + padded(b"ok")
    data = tar_bytes(header(b"p", typeflag=b"x", size=limit), records, member)
    assert (extract(tmp_path, data) / "named.txt").read_bytes() == b"ok"
    over = tar_bytes(header(b"p", typeflag=b"x", size=limit + 1), padded(records + b"\n"), member)
    (tmp_path / "a.tar").unlink()
    shutil.rmtree(tmp_path / "dest")
    why = f"has {limit + 1} bytes of pax header; at most {limit} are accepted"
    refused(tmp_path, over, UnsafeArchiveError, why)


def test_metadata_cut_short_is_corruption_saying_where(tmp_path: Path) -> None:
    """Before any member the refusal says only what was cut; after one it names that member."""
    first = header(b"././@LongLink", typeflag=b"L", size=600) + b"n" * 100
    refused(tmp_path, first, IntegrityError, "is corrupt: truncated in its long name")
    later = header(b"f", size=1) + padded(b"x") + header(b"p", typeflag=b"x", size=100) + b"1" * 50
    why = "is corrupt after member 'f': truncated in its pax header"
    refused(tmp_path, later, IntegrityError, why)


def test_a_bad_header_after_a_member_names_that_member(tmp_path: Path) -> None:
    bad = bytearray(header(b"g", size=1))
    bad[0:1] = b"h"  # renamed without fixing the checksum
    data = tar_bytes(header(b"f", size=1), padded(b"x"), bytes(bad), padded(b"y"))
    why = "is corrupt after member 'f': a header has a bad checksum"
    refused(tmp_path, data, IntegrityError, why)


def base256(n: int, width: int = 12) -> bytes:
    """GNU's base-256 form of ``n`` for a numeric field (two's complement when negative)."""
    if n < 0:
        return b"\xff" + (n + (1 << (8 * (width - 1)))).to_bytes(width - 1, "big")
    return b"\x80" + n.to_bytes(width - 1, "big")


def with_mtime(h: bytes, field: bytes) -> bytes:
    """Header ``h`` with its mtime field replaced and its checksum recomputed."""
    b = bytearray(h)
    b[136:148] = field
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_member_mtimes_at_the_edges_of_the_header_fields(tmp_path: Path) -> None:
    """An mtime in 2100 (octal) is set to the nanosecond and a base-256 one before 1970 is
    kept; values past +-2**62 ns (the largest octal one, year 2242, and base-256 ones 158 years
    either side of 1970) are ignored: the file keeps the time it was written. Never an error:
    an odd timestamp is no reason to refuse a target."""
    members = {
        b"year-2100": b"%011o\0" % 4_102_444_800,
        b"before-1970": base256(-86_400),
        b"max-octal": b"77777777777\0",
        b"far-future": base256(5 * 10**9),
        b"far-past": base256(-5 * 10**9),
    }
    blocks = [
        with_mtime(header(name, size=1), field) + padded(b"x") for name, field in members.items()
    ]
    # pax mtimes of exactly +-2**62 ns (the first values out of range): ignored too
    for name, value in (
        (b"pax-2-62", "4611686018.427387904"),
        (b"pax-minus-2-62", "-4611686018.427387904"),
    ):
        rec = pax_record("mtime", value)
        blocks += [header(b"p", typeflag=b"x", size=len(rec)), padded(rec)]
        blocks += [header(name, size=1), padded(b"x")]
    (tmp_path / "a.tar").write_bytes(tar_bytes(*blocks))
    stats = extract_archive(tmp_path / "a.tar", tmp_path / "dest", max_bytes=MAX)
    dest = tmp_path / "dest"
    mtime = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    # what the extraction reports is what the files carry, ignored header values included
    assert {rel: mt for rel, _, mt in stats.manifest} == mtime
    assert mtime["year-2100"] == 4_102_444_800 * 10**9
    assert mtime["before-1970"] == -86_400 * 10**9
    now = time.time_ns()
    for name in ("max-octal", "far-future", "far-past", "pax-2-62", "pax-minus-2-62"):
        assert abs(mtime[name] - now) < 86_400 * 10**9, name


def with_field(h: bytes, start: int, value: bytes) -> bytes:
    """Header ``h`` with ``value`` written at ``start`` and its checksum recomputed."""
    b = bytearray(h)
    b[start : start + len(value)] = value
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


E100 = "é".encode() * 50  # 100 bytes >= 0x80: header sums over 0o77777, signed ones negative


def with_checksum(h: bytes, form: bytes, *, signed: bool = False) -> bytes:
    """Header ``h`` with its checksum written as ``form % sum`` (the sum of the bytes with the
    field as spaces; signed bytes as old tars summed them)."""
    b = bytearray(h)
    b[148:156] = b" " * 8
    total = sum(struct.unpack("512b", bytes(b))) if signed else sum(b)
    b[148:156] = form % total
    return bytes(b)


def test_header_fields_filled_to_their_last_byte_are_read_like_gnu_tar(tmp_path: Path) -> None:
    """Names, prefixes, link targets and numbers that fill their fields without a terminator
    (ustar allows it), numbers left-aligned, a name that is not UTF-8, a positive base-256 mtime
    and junk in the header's padding: the same tree as GNU tar's, byte for byte."""
    name100 = b"n" * 100
    prefix155, tail = b"p" * 155, b"t" * 20
    link100 = b"l" * 100
    mtime = b"%012o" % 1_500_000_000  # twelve digits, no terminator
    members = [
        with_field(header(name100, size=1), 100, b"00000750"),  # eight digits, no NUL
        padded(b"1"),
        with_field(with_field(header(tail, size=1), 345, prefix155), 500, b"JUNK"),
        padded(b"2"),
        with_field(header(b"link", typeflag=b"2"), 157, link100),
        with_field(with_field(header(b"caf\xe9", size=1), 136, mtime), 100, b"755\0\0\0\0\0"),
        padded(b"3"),
        with_mtime(header(b"b256", size=1), base256(1_600_000_000)),
        padded(b"4"),
        with_field(header(b"n", size=1), 345, b"q"),  # a one-byte prefix
        padded(b"5"),
        # checksums as other writers put them: six digits and two NULs, seven digits and a
        # space (no NUL), a sum over 0o77777 (bytes >= 0x80), and the signed sum of old tars
        with_checksum(header(b"two-nuls", size=1), b"%06o\0\0"),
        padded(b"6"),
        with_checksum(header(b"seven-digits", size=1), b"%07o "),
        padded(b"7"),
        with_checksum(with_field(header(E100, typeflag=b"2"), 157, E100), b"%06o\0 "),
        # signed: one byte >= 0x80 in each half of the header around the checksum field
        with_checksum(
            with_field(header(b"signed-\xc3\xa9", typeflag=b"2"), 157, b"t\xc3\xa9"),
            b"%06o\0 ",
            signed=True,
        ),
    ]
    ours = extract(tmp_path, tar_bytes(*members))
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-C", gnu, "-xf", tmp_path / "a.tar"], check=True, capture_output=True)

    def listing(root: Path) -> dict[bytes, tuple[int, int, bytes]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                body = os.readlink(p) if os.path.islink(p) else b""
                if os.path.isfile(p) and not os.path.islink(p):
                    body = Path(os.fsdecode(p)).read_bytes()
                rel = os.path.relpath(p, os.fsencode(root))
                out[rel] = (st.st_mode, int(st.st_mtime) if not os.path.isdir(p) else 0, body)
        return out

    got = listing(ours)
    assert got == listing(gnu)
    assert got[name100][0] & 0o777 == 0o750
    assert got[prefix155 + b"/" + tail][2] == b"2"
    assert got[b"link"][2] == link100
    assert got[b"caf\xe9"][:2] == (0o100755, 1_500_000_000)
    assert got[b"b256"][1] == 1_600_000_000
    assert got[b"q/n"][2] == b"5"
    assert (got[b"two-nuls"][2], got[b"seven-digits"][2]) == (b"6", b"7")
    assert got[E100][2] == E100  # a link to itself: it resolves nowhere, and stays inside
    assert got[b"signed-\xc3\xa9"][2] == b"t\xc3\xa9"


def test_a_global_pax_header_applies_to_every_later_member_like_gnu_tar(tmp_path: Path) -> None:
    """A global header's mtime is every following member's, unless the member's own pax
    header says otherwise; a typeflag 'G' (no such thing) is refused."""
    g = pax_record("mtime", "1500000000")
    local = pax_record("mtime", "1400000000")
    data = tar_bytes(
        header(b"g", typeflag=b"g", size=len(g)),
        padded(g),
        header(b"a", size=1),
        padded(b"a"),
        header(b"x", typeflag=b"x", size=len(local)),
        padded(local),
        header(b"b", size=1),
        padded(b"b"),
    )
    ours = extract(tmp_path, data)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-C", gnu, "-xf", tmp_path / "a.tar"], check=True, capture_output=True)
    for root in (ours, gnu):
        assert sorted(os.listdir(root)) == ["a", "b"]
        assert (root / "a").stat().st_mtime == 1_500_000_000
        assert (root / "b").stat().st_mtime == 1_400_000_000
    shutil.rmtree(ours)
    shutil.rmtree(gnu)
    (tmp_path / "a.tar").unlink()
    bogus = tar_bytes(header(b"g", typeflag=b"G", size=len(g)), padded(g))
    refused(tmp_path, bogus, UnsafeArchiveError, "has the unsupported type b'G'")


@pytest.mark.parametrize(
    ("typeflag", "records"),
    [(b"S", b""), (b"0", pax_record("GNU.sparse.major", "1"))],
    ids=["gnu-old-sparse", "pax-sparse"],
)
def test_sparse_members_are_refused_by_type_or_pax_record(
    tmp_path: Path, typeflag: bytes, records: bytes
) -> None:
    pax = (header(b"p", typeflag=b"x", size=len(records)) + padded(records)) if records else b""
    data = tar_bytes(pax, header(b"holes", typeflag=typeflag, size=1), padded(b"x"))
    refused(
        tmp_path, data, UnsafeArchiveError, "is a sparse file; sparse members are not supported"
    )


def test_a_pre_posix_directory_is_marked_by_a_slash(tmp_path: Path) -> None:
    """A regular-file typeflag with a name ending in '/' is a directory (old tars), with its
    mode and mtime; a contiguous file (typeflag '7') is a file."""
    data = tar_bytes(
        with_field(with_mtime(header(b"old/"), b"%011o\0" % 1_400_000_000), 100, b"0000750\0"),
        header(b"old/f", size=1),
        padded(b"x"),
        header(b"contig", typeflag=b"7", size=2),
        padded(b"cc"),
        header(b"contig-slash/", typeflag=b"7", size=1),  # the slash marks no directory here
        padded(b"s"),
    )
    dest = extract(tmp_path, data)
    st = (dest / "old").stat()
    assert (oct(st.st_mode), st.st_mtime) == (oct(0o40750), 1_400_000_000)
    assert (dest / "old/f").read_bytes() == b"x"
    assert (dest / "contig").read_bytes() == b"cc"
    assert (dest / "contig-slash").read_bytes() == b"s"


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        # the mode is read once the member is known, the mtime and size before
        (100, b"0000z44\0", "after member 'f2': invalid mode field b'0000z44\\x00'"),
        (136, b"0000000000z\0", "after member 'f1': invalid mtime field b'0000000000z\\x00'"),
        (124, b"\xff\x80" + bytes(10), f"after member 'f1': negative size {-(1 << 87)}"),
        (124, bytes(12), None),
    ],
    ids=["mode", "mtime", "base256-negative-size", "empty-size-field"],
)
def test_numeric_fields_are_read_up_to_their_terminator_and_refused_naming_them(
    tmp_path: Path, field: int, value: bytes, why: str | None
) -> None:
    bad = with_field(header(b"f2", size=1), field, value)
    data = tar_bytes(header(b"f1", size=1), padded(b"1"), bad, padded(b"2"))
    if why is None:  # an empty field is 0, as GNU tar reads it: f2 is empty, no data follows
        dest = extract(tmp_path, tar_bytes(header(b"f1", size=1), padded(b"1"), bad))
        assert ((dest / "f1").read_bytes(), (dest / "f2").read_bytes()) == (b"1", b"")
        return
    refused(tmp_path, data, IntegrityError, f"is corrupt {why}")


@pytest.mark.parametrize(
    ("typeflag", "what"),
    [(b"K", "long link name"), (b"x", "pax header"), (b"g", "pax global header")],
)
def test_each_kind_of_metadata_cut_short_is_named(
    tmp_path: Path, typeflag: bytes, what: str
) -> None:
    data = header(b"m", typeflag=typeflag, size=600) + b"1" * 100
    refused(tmp_path, data, IntegrityError, f"is corrupt: truncated in its {what}")
