"""A malicious-archive corpus, generated here: every kind must raise UnsafeArchiveError, leave no
destination behind and write nothing outside it."""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from forgespace.cache.archive import detect_archive, extract_archive
from forgespace.errors import ForgespaceError, IntegrityError, UnsafeArchiveError

MAX = 1_000_000


# ---- builders --------------------------------------------------------------------------------


def _tinfo(
    name: str,
    type_: bytes = tarfile.REGTYPE,
    *,
    size: int = 0,
    mode: int = 0o644,
    linkname: str = "",
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    ti.mode = mode
    ti.linkname = linkname
    ti.mtime = 1_600_000_000
    return ti


TarMember = tuple[tarfile.TarInfo, bytes]


def _file(name: str, data: bytes = b"pwned\n", mode: int = 0o644) -> TarMember:
    return _tinfo(name, size=len(data), mode=mode), data


def _sym(name: str, target: str) -> TarMember:
    return _tinfo(name, tarfile.SYMTYPE, linkname=target, mode=0o777), b""


def _hard(name: str, target: str) -> TarMember:
    return _tinfo(name, tarfile.LNKTYPE, linkname=target), b""


def _dir(name: str, mode: int = 0o755) -> TarMember:
    return _tinfo(name, tarfile.DIRTYPE, mode=mode), b""


def write_tar(path: Path, members: list[TarMember], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:  # type: ignore[call-overload]
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


def write_zip(path: Path, members: list[tuple[str, int, bytes]]) -> Path:
    """members: (name, unix st_mode incl. file type, data)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, st_mode, data in members:
            zi = zipfile.ZipInfo(name, date_time=(2020, 9, 13, 12, 0, 0))
            zi.create_system = 3
            zi.external_attr = (st_mode & 0xFFFF) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    return path


# ---- the corpus ------------------------------------------------------------------------------
# Each builder gets (archive path, sentinel dir outside the destination) and returns the archive.

Builder = Callable[[Path, Path], Path]


def tar_absolute(a: Path, out: Path) -> Path:
    return write_tar(a, [_file("ok.txt"), _file(str(out / "evil"))])


def tar_dotdot(a: Path, out: Path) -> Path:
    return write_tar(a, [_file("../outside/evil")])


def tar_nested_dotdot(a: Path, out: Path) -> Path:
    return write_tar(a, [_dir("a"), _dir("a/b"), _file("a/b/../../../outside/evil")])


def tar_symlink_absolute(a: Path, out: Path) -> Path:
    return write_tar(a, [_sym("link", str(out))])


def tar_symlink_relative(a: Path, out: Path) -> Path:
    return write_tar(a, [_dir("sub"), _sym("sub/link", "../../outside")])


def tar_symlink_chain(a: Path, out: Path) -> Path:
    # Each target looks inside on its own; together they reach the parent of the destination.
    return write_tar(a, [_dir("d"), _sym("d/s", ".."), _sym("l", "d/s/../outside")])


def tar_hardlink_out(a: Path, out: Path) -> Path:
    return write_tar(a, [_hard("hl", "../outside/secret")])


def tar_hardlink_absolute(a: Path, out: Path) -> Path:
    return write_tar(a, [_hard("hl", str(out / "secret"))])


def tar_hardlink_through_symlink(a: Path, out: Path) -> Path:
    # The link chain points outside; a hard link made through it would share an outside inode.
    return write_tar(
        a, [_dir("d"), _sym("d/s", ".."), _sym("l", "d/s/../outside"), _hard("hl", "l/secret")]
    )


def tar_hardlink_to_missing(a: Path, out: Path) -> Path:
    return write_tar(a, [_hard("hl", "never-extracted")])


def tar_link_then_write_through(a: Path, out: Path) -> Path:
    return write_tar(a, [_sym("link", str(out)), _file("link/evil")])


def tar_write_through_inner_link(a: Path, out: Path) -> Path:
    # Even a link that stays inside is never written through.
    return write_tar(a, [_dir("real"), _sym("alias", "real"), _file("alias/evil")])


def tar_replace_file_with_escaping_link(a: Path, out: Path) -> Path:
    return write_tar(a, [_file("x"), _sym("x", "../outside/secret"), _file("x", b"overwrite")])


def tar_device(a: Path, out: Path) -> Path:
    ti = _tinfo("dev", tarfile.CHRTYPE, mode=0o666)
    ti.devmajor, ti.devminor = 1, 3
    return write_tar(a, [(ti, b"")])


def tar_block_device(a: Path, out: Path) -> Path:
    ti = _tinfo("blk", tarfile.BLKTYPE, mode=0o666)
    ti.devmajor, ti.devminor = 7, 0
    return write_tar(a, [(ti, b"")])


def tar_fifo(a: Path, out: Path) -> Path:
    return write_tar(a, [(_tinfo("fifo", tarfile.FIFOTYPE), b"")])


def tar_empty_name(a: Path, out: Path) -> Path:
    return write_tar(a, [_file("ok.txt"), _file("")])


def tgz_compressed_bomb(a: Path, out: Path) -> Path:
    # ~20 kB on disk, 20 MB once inflated, limit 1 MB.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = _tinfo("zeros", size=20 * MAX)
        tf.addfile(ti, io.BytesIO(bytes(20 * MAX)))
    a.write_bytes(gzip.compress(raw.getvalue(), 9))
    return a


def tar_many_members_bomb(a: Path, out: Path) -> Path:
    # Each member is below the limit; together they are not.
    return write_tar(a, [_file(f"f{i}", bytes(100_000)) for i in range(15)], "w:gz")


def tar_dir_over_symlink(a: Path, out: Path) -> Path:
    return write_tar(a, [_dir("real"), _sym("d", "real"), _dir("d"), _file("d/evil")])


def zip_traversal(a: Path, out: Path) -> Path:
    return write_zip(a, [("ok.txt", 0o100644, b"ok"), ("../outside/evil", 0o100644, b"pwned")])


def zip_absolute(a: Path, out: Path) -> Path:
    return write_zip(a, [(str(out / "evil"), 0o100644, b"pwned")])


def zip_symlink_out(a: Path, out: Path) -> Path:
    return write_zip(a, [("link", stat.S_IFLNK | 0o777, b"../outside")])


def zip_symlink_then_write(a: Path, out: Path) -> Path:
    return write_zip(
        a, [("link", stat.S_IFLNK | 0o777, str(out).encode()), ("link/evil", 0o100644, b"x")]
    )


def zip_bomb(a: Path, out: Path) -> Path:
    return write_zip(a, [("zeros", 0o100644, bytes(20 * MAX))])


def zip_device(a: Path, out: Path) -> Path:
    return write_zip(a, [("dev", stat.S_IFCHR | 0o666, b"")])


def zip_fifo(a: Path, out: Path) -> Path:
    return write_zip(a, [("fifo", stat.S_IFIFO | 0o644, b"")])


CORPUS: dict[str, Builder] = {
    f.__name__: f
    for f in (
        tar_absolute,
        tar_dotdot,
        tar_nested_dotdot,
        tar_symlink_absolute,
        tar_symlink_relative,
        tar_symlink_chain,
        tar_hardlink_out,
        tar_hardlink_absolute,
        tar_hardlink_through_symlink,
        tar_hardlink_to_missing,
        tar_link_then_write_through,
        tar_write_through_inner_link,
        tar_replace_file_with_escaping_link,
        tar_device,
        tar_block_device,
        tar_fifo,
        tar_empty_name,
        tgz_compressed_bomb,
        tar_many_members_bomb,
        tar_dir_over_symlink,
        zip_traversal,
        zip_absolute,
        zip_symlink_out,
        zip_symlink_then_write,
        zip_bomb,
        zip_device,
        zip_fifo,
    )
}


# What each refusal must say: the rule that caught it, not a side effect of another one.
WHY = {
    "tar_absolute": "absolute path",
    "tar_dotdot": "'..' component",
    "tar_nested_dotdot": "'..' component",
    "tar_symlink_absolute": "symlink to the absolute path",
    "tar_symlink_relative": "outside the destination",
    "tar_symlink_chain": "resolves outside the destination",
    "tar_hardlink_out": "hard link target .* '..' component",
    "tar_hardlink_absolute": "hard link target .* absolute path",
    "tar_hardlink_through_symlink": "not an earlier regular file",
    "tar_hardlink_to_missing": "not an earlier regular file",
    "tar_link_then_write_through": "symlink to the absolute path",
    "tar_write_through_inner_link": "written through the symlink 'alias'",
    "tar_replace_file_with_escaping_link": "outside the destination",
    "tar_device": "device node",
    "tar_block_device": "device node",
    "tar_fifo": "fifo",
    "tar_empty_name": "empty name",
    "tgz_compressed_bomb": "limit of 1000000 bytes",
    "tar_many_members_bomb": "limit of 1000000 bytes",
    "tar_dir_over_symlink": "directory where the archive put a symlink",
    "zip_traversal": "'..' component",
    "zip_absolute": "absolute path",
    "zip_symlink_out": "outside the destination",
    "zip_symlink_then_write": "symlink to the absolute path",
    "zip_bomb": "limit of 1000000 bytes",
    "zip_device": "special members",
    "zip_fifo": "special members",
}


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    snap: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            snap[str(p.relative_to(root))] = (st.st_mode, data)
    return snap


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_malicious_archive_is_refused_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch\n")
    archive = CORPUS[kind](tmp_path / "archive.bin", outside)
    before_outside = _snapshot(outside)
    before_top = sorted(os.listdir(tmp_path))
    dest = tmp_path / "dest"

    assert detect_archive(archive) in ("tar", "zip")
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, dest, max_bytes=MAX)

    assert str(archive) in str(info.value)
    assert re.search(WHY[kind], str(info.value)), str(info.value)
    assert not dest.exists()
    assert _snapshot(outside) == before_outside
    assert sorted(os.listdir(tmp_path)) == before_top
    assert not Path("/outside").exists()


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 12
    assert set(WHY) == set(CORPUS)


def test_error_names_the_member_and_the_rule(tmp_path: Path) -> None:
    archive = tar_dotdot(tmp_path / "a.tar", tmp_path)
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, tmp_path / "d", max_bytes=MAX)
    assert (info.value.member, info.value.reason) == (  # type: ignore[attr-defined]
        "../outside/evil",
        "contains a '..' component",
    )
    archive = tgz_compressed_bomb(tmp_path / "b.tgz", tmp_path)
    with pytest.raises(UnsafeArchiveError, match=r"'zeros'.*limit of 1000000 bytes"):
        extract_archive(archive, tmp_path / "d", max_bytes=MAX)


def test_setuid_setgid_sticky_bits_are_dropped(tmp_path: Path) -> None:
    archive = write_tar(
        tmp_path / "a.tar",
        [
            _dir("shared", mode=0o1777),
            _file("shared/suid", b"#!/bin/sh\n", mode=0o4755),
            _file("shared/sgid", b"data", mode=0o2640),
        ],
    )
    dest = tmp_path / "dest"
    extract_archive(archive, dest, max_bytes=MAX)
    assert stat.S_IMODE((dest / "shared").stat().st_mode) == 0o777
    assert stat.S_IMODE((dest / "shared/suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "shared/sgid").stat().st_mode) == 0o640


def test_zip_setuid_bits_are_dropped(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [("tool", 0o104755, b"#!/bin/sh\n")])
    dest = tmp_path / "dest"
    extract_archive(archive, dest, max_bytes=MAX)
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755


def test_size_limit_counts_exactly(tmp_path: Path) -> None:
    members = [_file("a", bytes(600)), _file("b", bytes(400))]
    archive = write_tar(tmp_path / "a.tar.gz", members, "w:gz")
    stats = extract_archive(archive, tmp_path / "ok", max_bytes=1000)
    assert stats.bytes == 1000
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "over", max_bytes=999)
    assert not (tmp_path / "over").exists()


def test_zip_member_inflating_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    """A zip whose headers under-declare a member's size: never more than the declared bytes are
    written, and the lie is reported (the CRC no longer matches) with nothing left behind."""
    archive = write_zip(tmp_path / "a.zip", [("zeros", 0o100644, bytes(5 * MAX))])
    raw = bytearray(archive.read_bytes())
    declared = (5 * MAX).to_bytes(4, "little")
    # Patch the uncompressed size in both the local header and the central directory.
    assert raw.count(declared) == 2
    raw = bytearray(bytes(raw).replace(declared, (100).to_bytes(4, "little")))
    archive.write_bytes(raw)
    dest = tmp_path / "dest"
    with pytest.raises((IntegrityError, UnsafeArchiveError)) as info:
        extract_archive(archive, dest, max_bytes=MAX)
    assert isinstance(info.value, ForgespaceError)
    assert not dest.exists()
