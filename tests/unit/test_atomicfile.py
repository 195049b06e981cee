"""atomicfile.write_atomic_at: the one atomic replace the store and the cache use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgespace.atomicfile import write_atomic_at


@pytest.fixture
def dfd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("fsync", [False, True])
def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path, dfd: int, fsync: bool) -> None:
    (tmp_path / "doc").write_bytes(b"old")
    write_atomic_at(dfd, "doc", b"new", tmp=".doc.tmp-1", fsync=fsync)
    assert (tmp_path / "doc").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["doc"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, dfd: int
) -> None:
    (tmp_path / "doc").write_bytes(b"old")
    (tmp_path / "doc-is-a-dir").mkdir()
    (tmp_path / "doc-is-a-dir" / "x").write_bytes(b"")
    with pytest.raises(OSError):  # rename over a non-empty directory fails
        write_atomic_at(dfd, "doc-is-a-dir", b"new", tmp=".t.tmp-1")
    assert (tmp_path / "doc").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["doc", "doc-is-a-dir"]


def test_a_planted_symlink_at_the_temporary_name_is_never_followed(
    tmp_path: Path, dfd: int
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / ".t.tmp-1")
    with pytest.raises(FileExistsError):
        write_atomic_at(dfd, "doc", b"new", tmp=".t.tmp-1")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "doc").exists()
