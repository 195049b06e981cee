"""What `cache verify` reports as planted (fsops.audit): every entry where forgespace expects one
of its own that is something else, named by what it is, and never followed or crossed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import MountRefused, tmpfs

from forgespace.cache import fsops


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "cache"
    for sub in fsops.INTERNAL_DIRS:
        (r / ".forgespace" / sub).mkdir(parents=True)
    yield r


def _socket_at(path: Path) -> None:
    # a socket node as a bound listener leaves it (bind would limit the path to 108 bytes)
    os.mknod(path, stat.S_IFSOCK | 0o600)


def test_a_clean_cache_has_nothing_to_report(root: Path) -> None:
    (root / ".forgespace" / "locks" / "t.lock").write_bytes(b"")
    (root / "t" / "r1" / "workspace").mkdir(parents=True)
    (root / "t" / "workspace").mkdir()
    assert fsops.audit(root) == []
    assert fsops.audit(root.parent / "missing") == []  # no cache yet: nothing planted


def test_planted_lock_entries_are_named_by_their_kind(root: Path, tmp_path: Path) -> None:
    locks = root / ".forgespace" / "locks"
    os.mkfifo(locks / "fifo.lock")
    _socket_at(locks / "sock.lock")
    (locks / "dir.lock").mkdir()
    (locks / "link.lock").symlink_to(tmp_path / "elsewhere")
    (locks / "ok.lock").write_bytes(b"")
    os.link(locks / "ok.lock", tmp_path / "second-name")  # a lock file with 2 links
    expected = {
        f"{locks}/fifo.lock: a fifo where a lock file belongs (refused, never followed)",
        f"{locks}/sock.lock: a socket where a lock file belongs (refused, never followed)",
        f"{locks}/dir.lock: a directory where a lock file belongs (refused, never followed)",
        f"{locks}/link.lock: a symbolic link (to {str(tmp_path / 'elsewhere')!r}) where a lock "
        "file belongs (refused, never followed)",
        f"{locks}/ok.lock: a lock file with 2 hard links (refused, never written)",
    }
    if os.geteuid() == 0:  # making a device node needs CAP_MKNOD
        os.mknod(locks / "dev.lock", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected.add(
            f"{locks}/dev.lock: a device node where a lock file belongs (refused, never followed)"
        )
    assert set(fsops.audit(root)) == expected


def test_a_bookkeeping_directory_that_is_not_one_is_refused(root: Path, tmp_path: Path) -> None:
    meta = root / ".forgespace"
    (meta / "owners").rmdir()
    (meta / "owners").write_bytes(b"")
    (meta / "tmp").rmdir()
    (meta / "tmp").symlink_to(tmp_path)
    assert sorted(fsops.audit(root)) == [
        f"{meta}/owners: a regular file (refused, never followed)",
        f"{meta}/tmp: a symbolic link (to {str(tmp_path)!r}) (refused, never followed)",
    ]


def test_planted_links_and_mounts_in_target_directories_are_reported(
    root: Path, tmp_path: Path
) -> None:
    (root / "t").mkdir()
    (root / "t" / "evil").symlink_to(tmp_path)  # a "run directory" that is a link
    (root / "t" / "r1").mkdir()
    (root / "t" / "r1" / "workspace").symlink_to(tmp_path)  # a run workspace that is a link
    (root / "v").write_bytes(b"")  # a file where target v's directory belongs
    (root / "not an id").write_bytes(b"")  # not named like a target: not the cache's
    (root / "u").symlink_to(tmp_path)  # a target directory that is a link
    found = [
        f"{root}/t/evil: a symbolic link (to {str(tmp_path)!r}) (refused, never followed)",
        f"{root}/t/r1/workspace: a symbolic link (refused, never followed)",
        f"{root}/u: a symbolic link (to {str(tmp_path)!r}) (refused, never followed)",
        f"{root}/v: a regular file (refused, never followed)",
    ]
    try:
        with tmpfs(root / "t" / "mnt"), tmpfs(root / "t" / "r2" / "workspace"):
            found += [
                f"{root}/t/mnt: a mount point (never crossed)",
                f"{root}/t/r2/workspace: a mount point forgespace did not make (never crossed)",
            ]
            assert sorted(fsops.audit(root)) == sorted(found)
    except MountRefused:  # not root: the links alone
        assert sorted(fsops.audit(root)) == sorted(found)
