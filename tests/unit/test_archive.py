"""Good archives of every format extract faithfully; detection is by content; damaged archives
raise IntegrityError and leave nothing behind."""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import re
import stat
import struct
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from support.trees import make_read_only

from forgespace.cache import archive as archive_mod
from forgespace.cache.archive import detect_archive, extract_archive
from forgespace.errors import CacheFullError, IntegrityError, UnsafeArchiveError

MAX = 10_000_000
MTIME = 1_600_000_000  # even: zip stores DOS times in 2-second steps


def make_source(root: Path) -> Path:
    """A small project: nested dirs, an executable, an empty file, an empty dir, an internal
    symlink, a read-only directory holding a file, all with known mtimes."""
    (root / "src/pkg").mkdir(parents=True)
    (root / "src/pkg/mod.py").write_text("print('hello')\n" * 50)
    (root / "src/pkg/data.bin").write_bytes(bytes(range(256)) * 40)
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "shared.txt").write_text("mode 0666 survives the umask\n")
    (root / "shared.txt").chmod(0o666)
    (root / "emptydir").mkdir()
    (root / "ro").mkdir()
    (root / "ro/inside.txt").write_text("read-only dir content\n")
    os.symlink("src/pkg/mod.py", root / "link-to-mod")
    os.symlink("../run.sh", root / "src/up-link")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(Path(dirpath, n), (MTIME, MTIME), follow_symlinks=False)
    (root / "ro").chmod(0o555)
    os.utime(root / "ro", (MTIME, MTIME))
    return root


def tree(root: Path) -> dict[str, tuple[str, object, int, int]]:
    """rel path -> (kind, content or link target, permission bits, mtime in s)."""
    out: dict[str, tuple[str, object, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), 0, int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st.st_mode), int(st.st_mtime))
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime))
    return out


def pack_tar(src: Path, out: Path, mode: str) -> Path:
    with tarfile.open(out, mode) as tf:  # type: ignore[call-overload]
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return out


def pack_zip(src: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            rel = str(p.relative_to(src))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                zi = zipfile.ZipInfo(rel, date_time=(2020, 9, 13, 12, 26, 40))
                zi.create_system = 3
                zi.external_attr = st.st_mode << 16
                zf.writestr(zi, os.readlink(p))
            else:
                zf.write(p, rel)
    return out


FORMATS = ["tar", "tgz", "tbz2", "txz", "zip", "gnu-tgz"]
# Names chosen to mislead: detection must look at the content.
MISLEADING_NAME = {
    "tar": "target.zip",
    "tgz": "target.tar.bz2",
    "tbz2": "target",
    "txz": "target.tar.gz",
    "zip": "target.tar",
    "gnu-tgz": "target.txt",
}


def build(fmt: str, src: Path, out: Path) -> Path:
    if fmt == "zip":
        return pack_zip(src, out)
    if fmt == "gnu-tgz":
        subprocess.run(["tar", "-C", str(src), "-czf", str(out), "."], check=True)
        return out
    return pack_tar(src, out, {"tar": "w", "tgz": "w:gz", "tbz2": "w:bz2", "txz": "w:xz"}[fmt])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "project")


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_archive_extracts_faithfully(tmp_path: Path, source: Path, fmt: str) -> None:
    archive = build(fmt, source, tmp_path / MISLEADING_NAME[fmt])
    assert detect_archive(archive) == ("zip" if fmt == "zip" else "tar")

    dest = tmp_path / "dest"
    stats = extract_archive(archive, dest, max_bytes=MAX)

    got, want = tree(dest), tree(source)
    if fmt == "zip":
        # zipfile stores no directory mtimes for implicit dirs; compare those without mtimes.
        got = {k: v if v[0] != "dir" else (*v[:3], 0) for k, v in got.items()}
        want = {k: v if v[0] != "dir" else (*v[:3], 0) for k, v in want.items()}
    assert got == want
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) & 0o111 == 0o111
    assert (dest / "link-to-mod").is_symlink()
    assert (dest / "src/up-link").read_text() == "#!/bin/sh\necho run\n"

    files = {k: v for k, v in want.items() if v[0] == "file"}
    assert stats.files == len(files)
    assert stats.dirs == len([v for v in want.values() if v[0] == "dir"])
    assert stats.bytes == sum(len(v[1]) for v in files.values())  # type: ignore[arg-type]
    assert {m[0]: (m[1], m[2]) for m in stats.manifest} == {
        k: (len(v[1]), (dest / k).stat().st_mtime_ns)  # type: ignore[arg-type]
        for k, v in files.items()
    }
    assert all(m[2] == MTIME * 10**9 for m in stats.manifest)


def test_duplicate_member_replaces_without_touching_hard_link_peer(tmp_path: Path) -> None:
    buf = tmp_path / "a.tar"
    with tarfile.open(buf, "w") as tf:
        for name, data in (("orig", b"original"), ("orig2", b"second")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        hl = tarfile.TarInfo("peer")
        hl.type, hl.linkname = tarfile.LNKTYPE, "orig"
        tf.addfile(hl)
        sl = tarfile.TarInfo("orig2")
        sl.type, sl.linkname = tarfile.SYMTYPE, "orig"
        tf.addfile(sl)
        again = tarfile.TarInfo("peer")
        again.size = 3
        tf.addfile(again, io.BytesIO(b"new"))
    dest = tmp_path / "dest"
    stats = extract_archive(buf, dest, max_bytes=MAX)
    assert (dest / "orig").read_bytes() == b"original"
    assert (dest / "peer").read_bytes() == b"new"
    assert os.readlink(dest / "orig2") == "orig"
    assert sorted(m[0] for m in stats.manifest) == ["orig", "peer"]


def test_hard_link_inside_is_kept(tmp_path: Path) -> None:
    buf = tmp_path / "a.tar"
    with tarfile.open(buf, "w") as tf:
        ti = tarfile.TarInfo("dir/file")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"data"))
        hl = tarfile.TarInfo("other/hl")
        hl.type, hl.linkname = tarfile.LNKTYPE, "dir/file"
        tf.addfile(hl)
    dest = tmp_path / "dest"
    extract_archive(buf, dest, max_bytes=MAX)
    assert (dest / "other/hl").stat().st_ino == (dest / "dir/file").stat().st_ino


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"just some text\n" * 100, id="text"),
        pytest.param(os.urandom(4096), id="random"),
        pytest.param(b"", id="empty"),
        pytest.param(gzip.compress(b"plain text, not a tar\n" * 100), id="gzip-of-text"),
        pytest.param(bz2.compress(b"plain text, not a tar\n" * 100), id="bz2-of-text"),
        pytest.param(lzma.compress(b"plain text, not a tar\n" * 100), id="xz-of-text"),
        pytest.param(b"\x1f\x8b\x08\x00garbage after a gzip magic", id="broken-gzip"),
        pytest.param(bytes(1 << 20), id="zero-filled-image"),
        pytest.param(
            b"#!/usr/bin/env python3\n" + b"PK\x03\x04" + bytes(100), id="shebang-then-zip"
        ),
    ],
)
def test_non_archives_stay_single_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "target.tar.gz"  # a misleading name must not matter
    p.write_bytes(content)
    assert detect_archive(p) is None
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (info.value.archive, info.value.member, info.value.reason) == (
        str(p),
        None,
        "is not an archive this can extract (accepted: tar, tar.gz, tar.bz2, tar.xz, zip)",
    )
    assert not (tmp_path / "dest").exists()


def test_empty_tar_is_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "empty.tgz"
    with tarfile.open(p, "w:gz"):
        pass
    assert detect_archive(p) == "tar"
    stats = extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (stats.files, os.listdir(tmp_path / "dest")) == (0, [])


def test_directory_is_not_an_archive(tmp_path: Path) -> None:
    assert detect_archive(tmp_path) is None


@pytest.mark.parametrize("fmt", ["tgz", "tar", "zip", "txz"])
def test_truncated_archive_raises_integrity_error(tmp_path: Path, source: Path, fmt: str) -> None:
    archive = build(fmt, source, tmp_path / f"a.{fmt}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=r"corrupt|truncated|not a readable"):
        extract_archive(archive, dest, max_bytes=MAX)
    assert not dest.exists()


def test_garbage_header_mid_tar_raises_integrity_error(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("first")
        ti.size = 10
        tf.addfile(ti, io.BytesIO(b"0123456789"))
    data = bytearray(p.read_bytes())
    data[1024:1536] = b"\xff" * 512  # where the end-of-archive zero block was
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("size", [5, 3 << 20], ids=["small", "past-the-read-ahead"])
def test_corrupt_gzip_crc_is_detected(tmp_path: Path, size: int) -> None:
    """The gzip trailer is checked even though the tar ends before the stream does."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = size
        tf.addfile(ti, io.BytesIO(os.urandom(size)))
    gz = bytearray(gzip.compress(raw.getvalue(), 1))
    gz[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    p = tmp_path / "a.tgz"
    p.write_bytes(bytes(gz))
    with pytest.raises(IntegrityError):
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert not (tmp_path / "dest").exists()


def test_existing_destination_is_refused_and_kept(tmp_path: Path, source: Path) -> None:
    archive = build("tgz", source, tmp_path / "a.tgz")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        extract_archive(archive, dest, max_bytes=MAX)
    assert info.value.errno == errno.EEXIST
    assert str(info.value) == f"[Errno 17] extraction destination already exists: {dest}"
    assert (dest / "keep").read_text() == "mine"


def test_a_refused_archive_leaves_no_file_descriptor_open(tmp_path: Path) -> None:
    """A worker extracts for days: each refusal closes what the extraction opened."""
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("/".join(["d" * 200] * 22) + "/f")  # deep: a parent fd is cached
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
        tf.addfile(tarfile.TarInfo("../escape"), io.BytesIO(b""))
    before = sorted(os.listdir("/proc/self/fd"))
    for i in range(3):
        with pytest.raises(UnsafeArchiveError):
            extract_archive(p, tmp_path / f"dest{i}", max_bytes=MAX)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_large_member_streams_in_chunks(tmp_path: Path) -> None:
    """A member bigger than the internal chunk is written completely and exactly."""
    data = os.urandom(3 * (1 << 20) + 123)
    p = tmp_path / "big.tgz"
    with tarfile.open(p, "w:gz", compresslevel=1) as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        ti2 = tarfile.TarInfo("after.txt")
        ti2.size = 5
        tf.addfile(ti2, io.BytesIO(b"after"))
    stats = extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (tmp_path / "dest/big.bin").read_bytes() == data
    assert (tmp_path / "dest/after.txt").read_bytes() == b"after"
    assert stats.bytes == len(data) + 5


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
def test_long_and_unicode_names_in_every_tar_format(tmp_path: Path, fmt: int) -> None:
    deep = "/".join(f"directory-level-{i:02d}" for i in range(7))  # > 100 chars, < 155 prefix
    name = f"{deep}/file.txt"
    target = "../" * 6 + "file.txt"  # resolves inside (to directory-level-00/file.txt)
    members: list[tuple[str, bytes, str | None]] = [
        ("directory-level-00/file.txt", b"top", None),
        (name, b"deep", None),
        (f"{deep}/link", b"", target),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("unicodé-ñame-" + "x" * 120, b"u", None))
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=fmt) as tf:
        for n, data, link in members:
            ti = tarfile.TarInfo(n)
            ti.mtime = MTIME
            if link is None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                tf.addfile(ti)
    dest = tmp_path / "dest"
    stats = extract_archive(p, dest, max_bytes=MAX)
    assert (dest / name).read_bytes() == b"deep"
    assert (dest / deep / "link").read_bytes() == b"top"
    assert os.readlink(dest / deep / "link") == target
    assert (dest / name).stat().st_mtime_ns == MTIME * 10**9
    if fmt != tarfile.USTAR_FORMAT:
        assert (dest / ("unicodé-ñame-" + "x" * 120)).read_bytes() == b"u"
    assert stats.files == len([m for m in members if m[2] is None])


def test_pax_fractional_mtime_is_kept(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        ti.mtime = 1_600_000_000.5  # type: ignore[assignment]
        tf.addfile(ti, io.BytesIO(b"x"))
    extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (tmp_path / "dest/f").stat().st_mtime_ns == 1_600_000_000_500_000_000


def test_sparse_member_is_refused_with_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(4 << 20)
        f.write(b"end")
    p = tmp_path / "a.tar"
    subprocess.run(["tar", "-C", str(src), "-cSf", str(p), "sparse"], check=True)
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("fmt", ["gnu-tgz", "zip"])
def test_read_only_extraction_matches_make_read_only(
    tmp_path: Path, source: Path, fmt: str
) -> None:
    archive = build(fmt, source, tmp_path / "a")
    plain, ro = tmp_path / "plain", tmp_path / "ro"
    extract_archive(archive, plain, max_bytes=MAX)
    make_read_only(plain)
    stats = extract_archive(archive, ro, max_bytes=MAX, read_only=True)
    assert tree(ro) == tree(plain)
    assert stat.S_IMODE(ro.stat().st_mode) == 0o555
    assert stat.S_IMODE((ro / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((ro / "src/pkg/mod.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((ro / "emptydir").stat().st_mode) == 0o555
    assert stats.files == 6


def test_full_disk_raises_cache_full_and_leaves_nothing(tmp_path: Path, small_tmpfs: Path) -> None:
    p = tmp_path / "a.tgz"
    with tarfile.open(p, "w:gz", compresslevel=1) as tf:
        for i in range(6):
            data = os.urandom(512 * 1024)  # 3 MiB in all, into a 2 MiB filesystem
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(CacheFullError, match="no space left") as info:
        extract_archive(p, small_tmpfs / "dest", max_bytes=MAX)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(small_tmpfs) == []


def test_header_with_a_bad_checksum_raises_integrity_error(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("first", "second"):
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"abc"))
    data = bytearray(p.read_bytes())
    assert data[1024:1030] == b"second"
    data[1024] = ord("X")  # renamed without fixing the header checksum
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert not (tmp_path / "dest").exists()


def test_written_bytes_are_counted_not_declared_sizes(tmp_path: Path) -> None:
    """A member whose data runs past what its header declared is stopped by the byte count."""
    dest = tmp_path / "dest"
    dest.mkdir()
    x = archive_mod._Extractor("lying.zip", str(dest), 1000)
    try:
        with pytest.raises(UnsafeArchiveError) as info:
            x.file_from("f", 0o644, None, 10, io.BytesIO(bytes(5000)))
        assert info.value.reason == (  # type: ignore[attr-defined]
            "took the extracted size above the limit of 1000 bytes (CACHE_MAX_SIZE)"
        )
    finally:
        x.close()
    assert (dest / "f").stat().st_size <= 1000


def test_corrupt_xz_footer_after_the_tar_end_is_detected(tmp_path: Path) -> None:
    """The tar ends before the xz stream does: the rest of the stream is still read and checked."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 3 << 20
        tf.addfile(ti, io.BytesIO(os.urandom(3 << 20)))
    xz = bytearray(lzma.compress(raw.getvalue(), preset=0))
    xz[-12] ^= 0xFF  # the CRC32 of the stream footer
    p = tmp_path / "a.txz"
    p.write_bytes(bytes(xz))
    with pytest.raises(IntegrityError, match="corrupt"):
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_member_count_is_bounded_and_nothing_is_left(tmp_path: Path, kind: str) -> None:
    """Empty files pass any byte limit: the member count has its own bound."""
    names = [f"d/f{i}" for i in range(50)]
    arc = tmp_path / f"many.{kind}"
    if kind == "tar":
        with tarfile.open(arc, "w:gz") as tf:
            for name in names:
                tf.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    else:
        with zipfile.ZipFile(arc, "w") as zf:
            for name in names:
                zf.writestr(name, b"")
    ok = extract_archive(arc, tmp_path / "ok", max_bytes=10**6, max_members=50)
    assert ok.files == 50
    with pytest.raises(UnsafeArchiveError, match="above the limit of 49 members"):
        extract_archive(arc, tmp_path / "refused", max_bytes=10**6, max_members=49)
    assert not (tmp_path / "refused").exists()


def test_default_member_limit_follows_the_byte_limit() -> None:
    assert archive_mod.member_limit(10 * 10**9) == 10 * 10**9 // 4096  # 2.4M for 10GB
    assert archive_mod.member_limit(10**6) == 100_000  # small caches keep ordinary projects


# --- edges: empty tars, zip metadata, hard links past PATH_MAX, where corruption is ----------


def test_a_plain_tar_is_not_taken_for_bzip2_by_its_fourth_byte(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("abc1.txt")  # "abc1": a digit where bzip2's level would be
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    assert detect_archive(p) == "tar"
    assert (extract_archive(p, tmp_path / "dest", max_bytes=MAX).files, 1) == (1, 1)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        pytest.param(bytes(512), None, id="one-zero-block"),
        pytest.param(bytes(1024), "tar", id="two-zero-blocks"),
        pytest.param(bytes(64 << 10), "tar", id="zero-blocks-at-the-64KiB-bound"),
        pytest.param(bytes((64 << 10) + 512), None, id="one-block-past-the-bound"),
        pytest.param(bytes(512) + b"X" * 512, None, id="zero-block-then-data"),
        pytest.param(bytes(1000), None, id="not-whole-blocks"),
    ],
)
def test_an_empty_tar_is_zero_blocks_only_and_small(
    tmp_path: Path, content: bytes, kind: str | None
) -> None:
    """What GNU tar writes for an empty archive (two or more zero blocks) is an archive; a zero
    block followed by data, or more zeros than an empty archive has, is a file (a disk image)."""
    p = tmp_path / "target"
    p.write_bytes(content)
    assert detect_archive(p) == kind


def test_a_huge_sparse_image_of_zeros_is_a_file_judged_from_its_start(tmp_path: Path) -> None:
    """1 TiB of zeros (sparse): detection reads no more than an empty archive can hold."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(1 << 40)
    assert detect_archive(p) is None


def _zip_entry(name: str, data: bytes, *, system: int, mode: int, extra: bytes = b"") -> tuple:
    zi = zipfile.ZipInfo(name, date_time=(2020, 9, 13, 12, 26, 40))
    zi.create_system, zi.external_attr, zi.extra = system, mode << 16, extra
    return zi, data


def _ut(flags: int, stamp: int) -> bytes:
    """An extended-timestamp extra field (0x5455) with one 4-byte time, as Info-ZIP writes."""
    return struct.pack("<HHBi", 0x5455, 5, flags, stamp)


def test_zip_mtimes_come_from_the_extended_timestamp_field_like_unzip(tmp_path: Path) -> None:
    """Info-ZIP's extended timestamp (UTC, to the second) wins over the DOS time (local, 2 s
    steps), also after another extra field and before 1970; a field without the mtime flag is
    passed over; directories get their times too. unzip sets the same (after 1970)."""
    dos = int(time.mktime((2020, 9, 13, 12, 26, 40, 0, 0, -1)))
    other = struct.pack("<HH4s", 0xCAFE, 4, b"abcd")
    # a field over 32 KiB (alignment padding; an odd size): its size is unsigned
    padding = struct.pack("<HH", 0xD935, 40_001) + bytes(40_001)
    short_ut = struct.pack("<HHB3s", 0x5455, 4, 1, b"\x01\x02\x03")  # too short for a time
    after_two = other + padding + _ut(1, 1_500_000_000)
    entries = [
        _zip_entry("d/", b"", system=3, mode=0o40755),
        _zip_entry("d/ut", b"1", system=3, mode=0o100644, extra=other + _ut(1, -86_400 * 366)),
        _zip_entry("d/atime-only", b"2", system=3, mode=0o100644, extra=_ut(2, 1_234_567_890)),
        _zip_entry("d/odd", b"3", system=3, mode=0o100644, extra=_ut(3, 1_600_000_001)),
        _zip_entry("d/after-two", b"4", system=3, mode=0o100644, extra=after_two),
        _zip_entry("d/short", b"5", system=3, mode=0o100644, extra=short_ut + other),
    ]
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w") as zf:
        for zi, data in entries:
            zf.writestr(zi, data)
    dest = tmp_path / "dest"
    extract_archive(p, dest, max_bytes=MAX)
    unzipped = tmp_path / "unzip"
    subprocess.run(["unzip", "-q", str(p), "-d", str(unzipped)], check=True)
    want = {"atime-only": dos, "odd": 1_600_000_001, ".": dos, "after-two": 1_500_000_000}
    want["short"] = dos
    for root in (dest, unzipped):
        got = {n: int((root / "d" / n).stat().st_mtime) for n in want}
        assert got == want, root
    # The field's time is signed (appnote's extrafld.txt): unzip 6 ignores one before 1970.
    assert (dest / "d/ut").stat().st_mtime == -86_400 * 366


def test_a_zip_from_a_non_unix_system_gets_default_modes(tmp_path: Path) -> None:
    """Its external attributes are not Unix modes (here bits that would read 0777): files are
    0644, directories 0755, and a directory entry without a Unix type is still a directory."""
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w") as zf:
        for zi, data in (
            _zip_entry("d/", b"", system=0, mode=0o777),
            _zip_entry("d/f", b"x", system=0, mode=0o100777),
        ):
            zf.writestr(zi, data)
    dest = tmp_path / "dest"
    old = os.umask(0o022)
    try:
        extract_archive(p, dest, max_bytes=MAX)
    finally:
        os.umask(old)
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "d/f").stat().st_mode) == 0o644
    assert (dest / "d/f").read_bytes() == b"x"


def test_a_zip_member_larger_than_a_chunk_is_recorded_whole(tmp_path: Path) -> None:
    data = os.urandom((3 << 20) + 7)
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("big.bin", data)
    stats = extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (tmp_path / "dest/big.bin").read_bytes() == data
    assert [m[:2] for m in stats.manifest] == [("big.bin", len(data))]
    assert stats.bytes == len(data)


@pytest.mark.parametrize(
    ("name", "mode", "data", "member", "reason"),
    [
        ("../evil", 0o100644, b"x", "../evil", "contains a '..' component"),
        (
            "fifo",
            0o10644,
            b"",
            "fifo",
            "is a device, fifo or socket; special members are not accepted",
        ),
        (
            "link",
            0o120777,
            b"a/" * 2048,
            "link",
            "cannot be created: [Errno 36] File name too long",
        ),
        ("link", 0o120777, b"a" * 5000, "link", "is a symlink with a 5000-byte target"),
    ],
    ids=["traversal", "fifo", "symlink-target-over-the-kernel-limit", "symlink-target-too-long"],
)
def test_refused_zip_members_are_named_with_the_rule(
    tmp_path: Path, name: str, mode: int, data: bytes, member: str, reason: str
) -> None:
    """The member as the zip names it and why; a 4096-byte link target (the kernel takes 4095)
    is read whole and refused, never cut to fit."""
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("ok", b"fine")
        zf.writestr(*_zip_entry(name, data, system=3, mode=mode))
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (info.value.archive, info.value.member) == (str(p), member)
    assert info.value.reason.startswith(reason)
    assert not (tmp_path / "dest").exists()


def test_hard_links_deeper_than_path_max_are_made(tmp_path: Path) -> None:
    """Both ends of the link lie more than PATH_MAX (4096 bytes) below the destination: the
    link is made from directory fds, and is the same file."""
    deep = "/".join(["d" * 200] * 22)  # 4,421 bytes
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo(f"{deep}/f")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"data"))
        hl = tarfile.TarInfo(f"{deep}/e/h")
        hl.type, hl.linkname = tarfile.LNKTYPE, f"{deep}/f"
        tf.addfile(hl)
    stats = extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    fd = os.open(tmp_path / "dest", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in deep.split("/"):
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f, h = os.stat("f", dir_fd=fd), os.stat("e/h", dir_fd=fd)
    finally:
        os.close(fd)
    assert (f.st_ino, f.st_nlink, h.st_size) == (h.st_ino, 2, 4)
    assert sorted(m[0].rsplit("/", 2)[-1] for m in stats.manifest) == ["f", "h"]


def test_a_stream_cut_inside_a_large_member_says_how_far_it_was_read(tmp_path: Path) -> None:
    """A download streamed into the extractor ends in the middle of a 3 MiB member: the error
    gives the decompressed position reached (past the member's first MiB) and the cause."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size = 3 << 20
        tf.addfile(ti, io.BytesIO(os.urandom(3 << 20)))
    p = tmp_path / "a.tgz"
    p.write_bytes(gzip.compress(raw.getvalue(), 1)[: 2 << 20])
    with open(p, "rb", buffering=0) as source, pytest.raises(IntegrityError) as info:
        archive_mod.extract_tar_stream(source, tmp_path / "dest", archive="a.tgz", max_bytes=MAX)
    err = info.value
    reason = err.reason  # type: ignore[attr-defined]
    m = re.fullmatch(r"is corrupt or truncated near byte (\d+): (.+)", reason)
    assert m, err
    assert 512 + (1 << 20) <= int(m[1]) <= 512 + (2 << 20)
    assert m[2] == str(err.__cause__)
    assert not (tmp_path / "dest").exists()


def test_a_packaged_artifact_is_a_file_yet_extracted_when_asked(tmp_path: Path) -> None:
    """A wheel stays a single-file target (detection), but extracting it is honoured."""
    p = tmp_path / "pkg.whl"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("pkg-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n")
        zf.writestr("pkg-1.0.dist-info/RECORD", b"")
        zf.writestr("pkg/__init__.py", b"x = 1\n")
    assert (detect_archive(p), archive_mod.artifact_kind(p)) == (None, "wheel")
    extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    assert (tmp_path / "dest/pkg/__init__.py").read_bytes() == b"x = 1\n"


def test_the_destination_is_not_world_writable_whatever_the_umask(tmp_path: Path) -> None:
    """Neither the destination nor the parents an archive only implies (no member of their
    own) are world-writable, even under umask 0; the implied ones are counted."""
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("implied/parent/f")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    old = os.umask(0)
    try:
        stats = extract_archive(p, tmp_path / "dest", max_bytes=MAX)
    finally:
        os.umask(old)
    for d in ("", "implied", "implied/parent"):
        assert stat.S_IMODE((tmp_path / "dest" / d).stat().st_mode) == 0o755, d
    assert (stats.files, stats.dirs) == (1, 2)


def _streamed(p: Path, dest: Path) -> IntegrityError:
    """The error of extracting ``p`` as a download streamed into the extractor."""
    with open(p, "rb", buffering=0) as source, pytest.raises(IntegrityError) as info:
        archive_mod.extract_tar_stream(source, dest, archive="a.tgz", max_bytes=MAX)
    assert not dest.exists()
    return info.value


def test_a_streamed_gzip_with_a_bad_crc_after_the_tar_end_is_refused(tmp_path: Path) -> None:
    """The end-of-archive blocks come before the gzip trailer: the rest of the stream is read so
    its CRC is checked (the streamed path inflates in this thread, no read-ahead does it)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 5
        tf.addfile(ti, io.BytesIO(b"hello"))
    gz = bytearray(gzip.compress(raw.getvalue() + bytes(64 << 10), 1))
    gz[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    p = tmp_path / "a.tgz"
    p.write_bytes(bytes(gz))
    err = _streamed(p, tmp_path / "dest")
    assert err.archive == "a.tgz"  # type: ignore[attr-defined]
    assert err.reason.startswith("is corrupt or truncated near byte")  # type: ignore[attr-defined]


def test_a_stream_cut_among_small_members_says_how_far_it_was_read(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for i in range(3000):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = 1000
            tf.addfile(ti, io.BytesIO(os.urandom(1000)))
    p = tmp_path / "a.tgz"
    p.write_bytes(gzip.compress(raw.getvalue(), 1)[: 2 << 20])
    err = _streamed(p, tmp_path / "dest")
    m = re.fullmatch(r"is corrupt or truncated near byte (\d+): .+", err.reason)  # type: ignore[attr-defined]
    assert m, err
    # past the first MiB of the tar (the cut is at 2 MiB of gzip), within what was there
    assert 1 << 20 <= int(m[1]) < len(raw.getvalue())


class _BreaksAfter(io.RawIOBase):
    """A decompressed stream that delivers ``data``, then fails as a corrupt one does."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        if not self.data:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_a_corrupt_stream_is_named_at_the_byte_it_was_read_to() -> None:
    reader = archive_mod._Reader(_BreaksAfter(b"x" * 700), "a.tgz", "m")
    assert reader.read(512) + reader.read(512) == b"x" * 700
    with pytest.raises(IntegrityError) as info:
        reader.read(512)
    assert info.value.reason.startswith("is corrupt or truncated near byte 700: ")  # type: ignore[attr-defined]


class _CountingSource:
    """A file read as a download is: counts the bytes delivered before each seek."""

    def __init__(self, f: io.FileIO) -> None:
        self.f, self.read, self.at_seek = f, 0, []  # type: list[int]

    def readinto(self, buf: memoryview) -> int | None:
        n = self.f.readinto(buf)
        self.read += n or 0
        return n

    def seek(self, offset: int) -> int:
        self.at_seek.append(self.read)
        return self.f.seek(offset)


def test_a_streamed_target_is_judged_from_its_first_chunk(tmp_path: Path) -> None:
    """Deciding that a stream holds a tar reads its first block and one chunk at most, never the
    whole download (extraction follows the bytes as they arrive)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("big.bin")
        ti.size = 8 << 20
        tf.addfile(ti, io.BytesIO(bytes(8 << 20)))
    p = tmp_path / "a.tar"
    p.write_bytes(raw.getvalue())
    with open(p, "rb", buffering=0) as f:
        source = _CountingSource(f)
        archive_mod.extract_tar_stream(
            source, tmp_path / "dest", archive="a.tar", max_bytes=1 << 30
        )
    assert len(source.at_seek) == 3  # detection twice, then extraction from the start
    assert source.at_seek[2] <= 512 + (1 << 20)
    assert (tmp_path / "dest/big.bin").stat().st_size == 8 << 20


def test_read_only_directories_extract_alike_for_root_and_a_non_root_worker(
    nobody_dir: Path,
) -> None:
    """A mode-000 directory holding a 0700 one with a recorded mtime: modes are applied deepest
    first, so an unprivileged worker (uid 65534, in a forked process) can still set the inner
    one's; the tree ends as the archive says."""
    p = nobody_dir / "a.tar"
    with tarfile.open(p, "w") as tf:
        for name, mode in (("locked", 0o000), ("locked/inner", 0o700)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, MTIME
            tf.addfile(ti)
    os.chown(p, 65534, 65534)
    as_root = extract_archive(p, nobody_dir / "as-root", max_bytes=MAX)  # root passes either way
    dest = nobody_dir / "dest"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody for good, extract, report
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            extract_archive(p, dest, max_bytes=MAX)
            os.write(w, b"ok")
        except BaseException as e:  # reported to the parent, whatever it is
            os.write(w, repr(e).encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    assert said == "ok"
    assert stat.S_IMODE((dest / "locked").stat().st_mode) == 0o000
    inner = (dest / "locked/inner").stat()
    assert (stat.S_IMODE(inner.st_mode), inner.st_mtime) == (0o700, MTIME)
    assert as_root.dirs == 2 and tree(nobody_dir / "as-root") == tree(dest)
    for root in (dest, nobody_dir / "as-root"):
        os.chmod(root / "locked", 0o700)  # let the fixture remove them
