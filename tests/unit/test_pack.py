"""Deterministic packing of a directory into tar.gz."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from forgespace.errors import UnsafeArchiveError
from forgespace.storage.pack import pack_directory, pack_to_file


def make_tree(root: Path, *, reverse: bool = False) -> Path:
    """A small tree; ``reverse`` creates the entries in the opposite order (other inodes,
    other directory order on disk) -- the archive must not care."""
    items: list[tuple[str, bytes | None]] = [
        ("a.txt", b"alpha\n"),
        ("b", None),
        ("b/c.py", b"print('c')\n"),
        ("b/d", None),
        ("b/d/e.bin", bytes(range(256)) * 40),
        ("z-last.txt", b"z\n"),
        ("empty", None),
    ]
    for rel, data in reversed(items) if reverse else items:
        p = root / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    tool = root / "b" / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o700)
    (root / "b" / "c-link.py").symlink_to("c.py")
    (root / "a.txt").chmod(0o600)
    return root


def pack_bytes(src: Path) -> bytes:
    buf = io.BytesIO()
    pack_directory(src, buf)
    return buf.getvalue()


def test_same_tree_same_bytes_whatever_mtimes_order_and_modes(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one")
    two = make_tree(tmp_path / "two", reverse=True)
    for p in two.rglob("*"):
        os.utime(p, (123456, 123456), follow_symlinks=False)
    (two / "b" / "tool.sh").chmod(0o755)  # same exec bit, other bits differ
    (two / "a.txt").chmod(0o644)
    first = pack_bytes(one)
    assert first == pack_bytes(one)
    assert first == pack_bytes(two)


def test_content_change_changes_bytes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = pack_bytes(tree)
    (tree / "b" / "c.py").write_bytes(b"print('C')\n")
    assert pack_bytes(tree) != before


def test_members_are_the_contents_sorted_with_normalised_owners(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "project")
    with tarfile.open(fileobj=io.BytesIO(pack_bytes(tree))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "a.txt",
        "b",
        "b/c-link.py",
        "b/c.py",
        "b/d",
        "b/d/e.bin",
        "b/tool.sh",
        "empty",
        "z-last.txt",
    ]
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
        assert not m.name.startswith(("/", "project"))
    by_name = {m.name: m for m in members}
    assert by_name["b/tool.sh"].mode == 0o755
    assert by_name["a.txt"].mode == 0o644  # 0600 on disk: umask differences do not leak
    assert by_name["b"].isdir() and by_name["b"].mode == 0o755
    assert by_name["b/c-link.py"].issym() and by_name["b/c-link.py"].linkname == "c.py"
    assert by_name["b/d/e.bin"].size == 256 * 40


def test_setuid_is_not_packed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "s").write_text("x")
    (tree / "s").chmod(0o4755)
    with tarfile.open(fileobj=io.BytesIO(pack_bytes(tree))) as tar:
        assert tar.getmember("s").mode == 0o755


def test_gzip_header_has_no_name_and_no_time(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    out = tmp_path / "named-file.tar.gz"
    pack_to_file(tree, out)
    head = out.read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08"
    assert head[3] & 0x08 == 0  # FNAME flag unset: the temp file's name is not recorded
    assert head[4:8] == b"\x00\x00\x00\x00"  # mtime 0


def test_gnu_tar_reads_it_and_extracts_exec_bits(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    tree = make_tree(tmp_path / "t")
    out = tmp_path / "t.tar.gz"
    stats = pack_to_file(tree, out)
    assert stats.size == out.stat().st_size
    assert stats.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (stats.files, stats.dirs, stats.symlinks) == (5, 3, 1)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xzf", str(out), "-C", str(dest)], check=True)
    assert (dest / "b" / "d" / "e.bin").read_bytes() == bytes(range(256)) * 40
    assert os.access(dest / "b" / "tool.sh", os.X_OK)
    assert os.readlink(dest / "b" / "c-link.py") == "c.py"


@pytest.mark.parametrize("link", ["/etc/passwd", "../../outside", "../.."])
def test_links_leaving_the_tree_are_refused(tmp_path: Path, link: str) -> None:
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "bad").symlink_to(link)
    out = tmp_path / "out.tar.gz"
    with pytest.raises(UnsafeArchiveError, match="sub/bad"):
        pack_to_file(tree, out)
    assert not out.exists()


def test_link_to_a_sibling_directory_is_fine(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "up").symlink_to("../../a")
    with tarfile.open(fileobj=io.BytesIO(pack_bytes(tree))) as tar:
        assert tar.getmember("a/b/up").linkname == "../../a"


def test_fifo_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    os.mkfifo(tree / "pipe")
    with pytest.raises(UnsafeArchiveError, match="pipe"):
        pack_bytes(tree)


def test_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        pack_bytes(f)


def test_packing_streams_without_holding_files_in_memory(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    block = os.urandom(1 << 20)
    with open(tree / "big.bin", "wb") as f:
        for _ in range(48):
            f.write(block)
    tracemalloc.start()
    try:
        with open(tmp_path / "out.tar.gz", "wb") as out:
            stats = pack_directory(tree, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.content_bytes == 48 << 20
    assert peak < 8 << 20, peak
