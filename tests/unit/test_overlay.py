"""Overlay mounts on the ordinary filesystem (tmp_path), made by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgespace.cache.overlay import mount_overlay, mounts_under, probe_overlay, unmount
from forgespace.errors import BackendUnavailableError


@pytest.fixture
def overlay_ok(tmp_path: Path) -> Iterator[None]:
    try:
        probe_overlay(tmp_path)
    except BackendUnavailableError as e:
        pytest.skip(f"overlay mounts refused here: {e}")
    yield
    # A failing test must not leave mounts behind: detach them with the system tool, not ours.
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split(" ")[4].replace("\\040", " ").replace("\\011", "\t")
        if mp.startswith(f"{tmp_path}/"):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


def layers(base: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "keep.txt").write_text("lower data")
    (lower / "sub").mkdir()
    (lower / "sub/remove-me").write_text("x")
    return lower, upper, work, mnt


@pytest.mark.usefixtures("overlay_ok")
def test_writes_land_in_upper_and_lower_is_unchanged(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path / "ov")
    mount_overlay(lower, upper, work, mnt)
    try:
        assert mnt in mounts_under(tmp_path)
        assert (mnt / "keep.txt").read_text() == "lower data"
        (mnt / "keep.txt").write_text("changed in run")
        (mnt / "new.txt").write_text("new")
        (mnt / "sub/remove-me").unlink()
        assert (lower / "keep.txt").read_text() == "lower data"
        assert not (lower / "new.txt").exists()
        assert (lower / "sub/remove-me").exists()
        assert (upper / "keep.txt").read_text() == "changed in run"
        assert (upper / "new.txt").read_text() == "new"
    finally:
        unmount(mnt)
    assert mnt not in mounts_under(tmp_path)
    assert os.listdir(mnt) == []


@pytest.mark.usefixtures("overlay_ok")
def test_two_runs_on_one_lower_do_not_see_each_other(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("base")
    mnts = []
    for run in ("r1", "r2"):
        up, wk, mnt = (tmp_path / run / n for n in ("upper", "work", "mnt"))
        for d in (up, wk, mnt):
            d.mkdir(parents=True)
        mount_overlay(lower, up, wk, mnt)
        mnts.append(mnt)
    try:
        (mnts[0] / "marker-r1").write_text("1")
        (mnts[1] / "f").write_text("r2 wrote")
        assert not (mnts[1] / "marker-r1").exists()
        assert (mnts[0] / "f").read_text() == "base"
    finally:
        for m in mnts:
            unmount(m)


@pytest.mark.usefixtures("overlay_ok")
def test_paths_with_spaces_commas_and_colons(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path / "odd dir, with: chars\tand tab")
    mount_overlay(lower, upper, work, mnt)
    try:
        assert (mnt / "keep.txt").read_text() == "lower data"
        assert mnt in mounts_under(tmp_path)  # octal escapes in mountinfo decoded
    finally:
        unmount(mnt)
    assert mounts_under(tmp_path) == []


@pytest.mark.usefixtures("overlay_ok")
def test_mounts_under_lists_deepest_first_and_excludes_root(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path / "a")
    mount_overlay(lower, upper, work, mnt)
    try:
        assert mounts_under(mnt) == []  # the root itself is not "under" it
        assert mounts_under(tmp_path / "elsewhere") == []
        assert mounts_under(tmp_path) == [mnt]
    finally:
        unmount(mnt)


@pytest.mark.usefixtures("overlay_ok")
def test_unmount_busy_mount_is_bounded_and_detaches(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path / "busy")
    mount_overlay(lower, upper, work, mnt)
    fd = os.open(mnt / "keep.txt", os.O_RDONLY)
    try:
        t0 = time.monotonic()
        unmount(mnt, timeout=0.3)
        assert time.monotonic() - t0 < 3
        assert mnt not in mounts_under(tmp_path)
        assert os.read(fd, 100) == b"lower data"  # the holder keeps working
    finally:
        os.close(fd)


def test_unmount_of_a_plain_directory_is_a_no_op(tmp_path: Path) -> None:
    unmount(tmp_path)
    unmount(tmp_path / "missing")


@pytest.mark.usefixtures("overlay_ok")
def test_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    probe_overlay(scratch)
    assert os.listdir(scratch) == []
    assert mounts_under(tmp_path) == []


def test_probe_reports_the_reason(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"/proc"):
        probe_overlay("/proc")  # layers cannot be created there


@pytest.mark.usefixtures("overlay_ok")
def test_bad_mount_arguments_name_the_paths(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(OSError, match="missing-lower"):
        mount_overlay(tmp_path / "missing-lower", tmp_path / "u", tmp_path / "w", mnt)
    assert mounts_under(tmp_path) == []


@pytest.mark.usefixtures("overlay_ok")
def test_volatile_mount_works(tmp_path: Path) -> None:
    lower, upper, work, mnt = layers(tmp_path / "vol")
    mount_overlay(lower, upper, work, mnt, volatile=True)
    try:
        (mnt / "w").write_text("x")
        assert any(
            "volatile" in line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(mnt) in line
        )
    finally:
        unmount(mnt)
    assert (upper / "w").read_text() == "x"
