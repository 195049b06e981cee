"""What the extractor does when members of one archive collide or are cut short: a later member
replaces an earlier file or link of the same name; anything that would turn a directory into
something else, write through a file, or link to what is not an earlier file is refused,
naming the archive and the member, and nothing is left behind."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from forgespace.cache import fsops
from forgespace.cache.archive import extract_archive
from forgespace.errors import IntegrityError, UnsafeArchiveError

MAX = 1 << 20


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    return name, kind, data, link


def tar_of(*members: tuple, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = 1_600_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def extract(tmp_path: Path, data: bytes) -> Path:
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    return tmp_path / "dest"


def refused(tmp_path: Path, data: bytes, error: type[Exception], why: str, name: str) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    with pytest.raises(error) as info:
        extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    # the whole reason, not a substring: a refusal says exactly which rule and why
    assert (info.value.archive, info.value.member, info.value.reason) == (str(archive), name, why)
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


SYM, DIR, LNK = tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE

# (members, the member named in the refusal as tar records it, why)

REFUSED = {
    "a file where a directory is needed": (
        [member("a", data=b"1"), member("a/b", data=b"2")],
        "a/b", "needs a directory where the archive put a file ('a')",
    ),
    "a file replacing a directory": (
        [member("d", DIR), member("d/x", data=b"1"), member("d", data=b"2")],
        "d", "would replace a directory",
    ),
    "a symlink replacing a directory": (
        [member("d", DIR), member("d", SYM, link="elsewhere")],
        "d", "would replace a directory",
    ),
    "a directory where a file was": (
        [member("d", data=b"1"), member("d", DIR)],
        "d/", "is a directory where the archive put a file",
    ),
    "a directory where a symlink was": (
        [member("l", SYM, link="x"), member("l", DIR)],
        "l/", "is a directory where the archive put a symlink",
    ),
    "writing through an earlier symlink": (
        [member("sub", DIR), member("l", SYM, link="sub"), member("l/f", data=b"x")],
        "l/f", "would be written through the symlink 'l'",
    ),
    "a symlink where the archive root belongs": (
        [member(".", SYM, link="x")], ".", "is a symlink where the archive root belongs",
    ),
    "a hard link where the archive root belongs": (
        [member("f", data=b"x"), member("./", LNK, link="f")],
        "./", "is a hard link where the archive root belongs",
    ),
    "a member under a name that a symlink had, then a file": (
        # the file replacing the link replaces its record too: what is refused is a file
        [member("a", SYM, link="d"), member("a", data=b"1"), member("a/x", data=b"2")],
        "a/x", "needs a directory where the archive put a file ('a')",
    ),
    "a file where the archive root belongs": (
        [member(".", data=b"x")], ".", "is a file where the archive root belongs",
    ),
    "an empty name": ([member("", data=b"x")], "", "has an empty name"),
    "an absolute name": (
        [member("/etc/cron.d/x", data=b"x")],
        "/etc/cron.d/x", "is an absolute path; only relative paths are accepted",
    ),
    "a symlink with an empty target": (
        [member("l", SYM, link="")], "l", "is a symlink with an empty target",
    ),
    "a hard link to a later member": (
        [member("h", LNK, link="f"), member("f", data=b"x")],
        "h", "is a hard link to 'f', which is not an earlier regular file of the archive",
    ),
    "a hard link to a directory": (
        [member("d", DIR), member("h", LNK, link="d")],
        "h", "is a hard link to 'd', which is not an earlier regular file of the archive",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_colliding_members_are_refused(tmp_path: Path, case: str) -> None:
    members, name, why = REFUSED[case]
    refused(tmp_path, tar_of(*members), UnsafeArchiveError, why, name)


def test_a_later_member_replaces_an_earlier_file_or_link(tmp_path: Path) -> None:
    dest = extract(
        tmp_path,
        tar_of(
            member("f", data=b"first"),
            member("f", data=b"second"),  # file over file
            member("l", SYM, link="f"),
            member("l", data=b"now a file"),  # file over symlink: the link goes, not its target
            member("g", data=b"g"),
            member("g", SYM, link="f"),  # symlink over file
            member("h", data=b"h"),
            member("h", LNK, link="f"),  # hard link over file
            member("f2", LNK, link="f"),  # a new name for the file
            member("self", data=b"s"),
            member("self", LNK, link="self"),  # a hard link to itself: nothing to do
        ),
    )
    assert (dest / "f").read_bytes() == b"second"
    assert stat.S_IMODE((dest / "f").stat().st_mode) == 0o644  # the replacement's own mode
    assert not (dest / "l").is_symlink() and (dest / "l").read_bytes() == b"now a file"
    assert os.readlink(dest / "g") == "f"
    assert (dest / "h").read_bytes() == b"second"
    assert os.stat(dest / "h").st_ino == os.stat(dest / "f").st_ino
    assert (dest / "self").read_bytes() == b"s"
    assert sorted(p.name for p in dest.iterdir()) == ["f", "f2", "g", "h", "l", "self"]


@pytest.mark.parametrize("size", [100, 300_000])  # read at once, and in chunks
def test_a_member_cut_short_is_corruption_naming_it(tmp_path: Path, size: int) -> None:
    whole = tar_of(member("ok", data=b"fine"), member("big.bin", data=os.urandom(size)))
    cut = whole[: 512 * 3 + size // 2]  # the second member's data stops half way
    refused(tmp_path, cut, IntegrityError, "is truncated in this member", "big.bin")


def test_group_and_other_write_bits_of_members_are_kept_as_the_archive_says(
    tmp_path: Path,
) -> None:
    # the process umask (022 here) must not silently drop modes the archive records
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("shared.txt")
        info.size, info.mode = 2, 0o666
        tf.addfile(info, io.BytesIO(b"hi"))
    old = os.umask(0o022)
    try:
        dest = extract(tmp_path, buf.getvalue())
    finally:
        os.umask(old)
    assert (dest / "shared.txt").stat().st_mode & 0o777 == 0o666


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (tarfile.FIFOTYPE, "is a fifo; fifo members are not accepted"),
        (tarfile.CHRTYPE, "is a device node; device members are not accepted"),
        (tarfile.BLKTYPE, "is a device node; device members are not accepted"),
        (b"Z", "has the unsupported type b'Z'"),
    ],
)
def test_special_members_are_refused(tmp_path: Path, kind: bytes, why: str) -> None:
    data = tar_of(member("ok", data=b"x"), member("special", kind))
    refused(tmp_path, data, UnsafeArchiveError, why, "special")


def test_gnu_long_names_and_long_link_targets_are_extracted(tmp_path: Path) -> None:
    deep = "/".join(["d" * 60] * 4)  # over the 100 bytes of a ustar name field
    target = "../" * 3 + "t" * 120  # a relative link target over 100 bytes, inside the tree
    dest = extract(
        tmp_path,
        tar_of(member(f"{deep}/f", data=b"deep"), member(f"{deep}/a/b/c/l", SYM, link=target)),
    )
    assert (dest / deep / "f").read_bytes() == b"deep"
    assert os.readlink(dest / deep / "a/b/c/l") == target


def test_a_metadata_member_over_the_limit_is_refused(tmp_path: Path) -> None:
    name = "n" * ((1 << 20) + 1)  # a GNU long name bigger than any path
    why = f"has {(1 << 20) + 2} bytes of long name; at most {1 << 20} are accepted"
    refused(tmp_path, tar_of(member(name, data=b"x")), UnsafeArchiveError, why, "")


def test_an_archive_without_end_blocks_is_accepted_one_cut_in_a_header_is_not(
    tmp_path: Path,
) -> None:
    whole = tar_of(member("a", data=b"1"), member("b", data=b"2"))
    body = whole[: 512 * 4]  # both members, no end-of-archive blocks (GNU tar accepts that)
    dest = extract(tmp_path, body)
    assert (dest / "a").read_bytes() == b"1" and (dest / "b").read_bytes() == b"2"
    (tmp_path / "a.tar").unlink()
    shutil.rmtree(dest)
    archive = tmp_path / "a.tar"
    archive.write_bytes(whole[: 512 * 2 + 100])  # the second header cut short
    with pytest.raises(IntegrityError) as info:
        extract_archive(archive, tmp_path / "dest", max_bytes=MAX)
    assert info.value.reason == "is corrupt after member 'a': truncated in a header"  # type: ignore[attr-defined]
    assert not (tmp_path / "dest").exists()


# --- symlinks: the lexical check, chains through other links, and the PATH_MAX bound ---------


@pytest.mark.parametrize("target", ["x/../..", "x//../..", "x/./../..", "./../x"])
def test_a_symlink_pointing_above_the_root_is_refused_by_its_own_target(
    tmp_path: Path, target: str
) -> None:
    """Empty and '.' components do not count as levels: refused when the link is read, with
    the target named, before any chain is followed."""
    why = f"is a symlink to {target!r}, outside the destination"
    refused(tmp_path, tar_of(member("l", SYM, link=target)), UnsafeArchiveError, why, "l")


@pytest.mark.parametrize(
    ("up", "target"),
    [
        ("sub/up", "sub/up/.."),
        ("sub/up", "sub//up/.."),  # an empty component is no level
        ("sub/up", "sub/./up/.."),
        ("sub/up", "./sub/up/.."),
        ("sub/deep/up", "sub/deep/up/.."),  # the link followed has several components
    ],
)
def test_a_chain_that_escapes_only_through_another_link_is_refused(
    tmp_path: Path, up: str, target: str
) -> None:
    """``up`` points at the root from inside; ``esc`` looks inside on its own but goes through
    ``up`` and one level above the root: the kernel would follow it out."""
    to_root = "/".join([".."] * up.count("/"))
    members = [member(up.rpartition("/")[0], DIR), member(up, SYM, link=to_root)]
    members.append(member("esc", SYM, link=target))
    why = f"is a symlink that resolves outside the destination through the symlink {up!r}"
    why += f" (target {target!r})"
    refused(tmp_path, tar_of(*members), UnsafeArchiveError, why, "esc")


def _chain_out(n: int) -> list[tuple]:
    """c1 -> c2 -> ... -> c{n} -> sub/up/.. and sub/up -> ..: members of a tar."""
    chain = [member(f"c{i}", SYM, link=f"c{i + 1}") for i in range(1, n)]
    chain.append(member(f"c{n}", SYM, link="sub/up/.."))
    return [*chain, member("sub", DIR), member("sub/up", SYM, link="..")]


def _kernel_jail(tmp_path: Path, members: list[tuple]) -> Path:
    """The same links made by hand under a directory with a marker next to it: the kernel's
    own verdict is whether ``jail/<link>/marker`` reaches the marker."""
    jail = tmp_path / "kernel" / "root"
    (jail / "sub").mkdir(parents=True)
    (tmp_path / "kernel" / "marker").write_text("outside")
    for name, _, _, link in members:
        if link:
            os.symlink(link, jail / name)
    return jail


WHY_UP = "is a symlink that resolves outside the destination through the symlink 'sub/up'"


def test_a_chain_of_forty_links_the_kernel_follows_out_is_refused_at_its_head(
    tmp_path: Path,
) -> None:
    """c1 -> c2 -> ... -> c39 -> sub/up/.. and sub/up -> ..: reaching c1 follows 40 links,
    exactly the kernel's limit (it refuses the 41st), and leaves the root. The first link of
    the chain is the one refused: every hop is counted, none twice."""
    members = _chain_out(39)
    refused(tmp_path, tar_of(*members), UnsafeArchiveError, WHY_UP + " (target 'c2')", "c1")
    jail = _kernel_jail(tmp_path, members)  # the chain leaves the root within the link limit
    assert (jail / "c1" / "marker").read_text() == "outside"


def test_in_a_chain_one_link_longer_the_first_link_the_kernel_follows_out_is_named(
    tmp_path: Path,
) -> None:
    """The same chain with one link more (41 to follow from c1): the kernel refuses c1 with
    ELOOP, so c1 leaves nothing; c2 (40 links) does, and the refusal names it."""
    members = _chain_out(40)
    refused(tmp_path, tar_of(*members), UnsafeArchiveError, WHY_UP + " (target 'c3')", "c2")
    jail = _kernel_jail(tmp_path, members)
    assert (jail / "c2" / "marker").read_text() == "outside"
    with pytest.raises(OSError) as info:
        (jail / "c1" / "marker").read_text()
    assert info.value.errno == errno.ELOOP


def test_a_symlink_at_the_path_max_bound_is_refused_one_byte_shorter_is_kept(
    tmp_path: Path,
) -> None:
    """A link whose full path (destination, '/', its name) reaches PATH_MAX (4096 bytes) is
    refused: chains through it could not be judged; one byte less is extracted."""
    dest = tmp_path / "dest"
    room = 4096 - len(os.fsencode(dest)) - 1  # bytes of a member name that reach the bound
    head = "/".join(["d" * 200] * ((room - 50) // 201))  # the last name gets 50-250 bytes
    at_bound = head + "/" + "l" * (room - len(head) - 1)
    assert len(os.fsencode(dest)) + 1 + len(at_bound) == 4096
    why = "is a symlink deeper than PATH_MAX (4096 bytes)"
    refused(tmp_path, tar_of(member(at_bound, SYM, link="x")), UnsafeArchiveError, why, at_bound)
    kept = extract(tmp_path, tar_of(member(at_bound[:-1], SYM, link="x")))
    assert os.readlink(kept / at_bound[:-1]) == "x"


def test_a_tree_deeper_than_path_max_in_one_byte_names_is_extracted(tmp_path: Path) -> None:
    """2,100 directories named 'a' (4,200 bytes of path): reached in steps, each under
    PATH_MAX, however short the names."""
    deep = "/".join(["a"] * 2100)
    try:
        dest = extract(tmp_path, tar_of(member(f"{deep}/f", data=b"bottom")))
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(2100):
                nfd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            with open(os.open("f", os.O_RDONLY, dir_fd=fd), "rb") as f:
                assert f.read() == b"bottom"
        finally:
            os.close(fd)
    finally:
        # shutil.rmtree (pytest's clean-up too) recurses once per level: too deep for it
        if (tmp_path / "dest").exists():
            fsops.remove(tmp_path, tmp_path / "dest")
