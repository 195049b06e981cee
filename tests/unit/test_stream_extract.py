"""archive.extract_tar_stream (what the streamed cold path feeds): exactly extract_archive's and
GNU tar's result for every tar compression, the same refusals, and None (nothing created) for
what is not a tar; storage.retry.DownloadTap lets it read a file while it is being written."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from test_archive import FORMATS, MAX, build, make_source, tree

from forgespace.cache.archive import extract_archive, extract_tar_stream
from forgespace.errors import CorruptArchiveError, UnsafeArchiveError
from forgespace.storage.base import ObjectInfo
from forgespace.storage.retry import DownloadStopped, DownloadTap, PartFile

TAR_FORMATS = [f for f in FORMATS if f != "zip"]


def _stream(archive: Path, dest: Path, **kw: object) -> object:
    with open(archive, "rb", buffering=0) as f:
        return extract_tar_stream(f, dest, archive="streamed", max_bytes=MAX, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "project")


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_streamed_equals_the_file_extraction(
    tmp_path: Path, source: Path, fmt: str, read_only: bool
) -> None:
    archive = build(fmt, source, tmp_path / "a")
    by_file = extract_archive(archive, tmp_path / "file", max_bytes=MAX, read_only=read_only)
    by_stream = _stream(archive, tmp_path / "stream", read_only=read_only)
    assert by_stream == by_file
    assert tree(tmp_path / "stream") == tree(tmp_path / "file")


def _gnu_tar_of_real_tree(tmp_path: Path) -> Path:
    """A real-world tree (this package's own sources, with their real mtimes and modes)
    packed by GNU tar, gzip-compressed."""
    import forgespace

    out = tmp_path / "real.tgz"
    pkg = Path(forgespace.__file__).parent
    subprocess.run(
        ["tar", "-C", str(pkg.parent), "--exclude=__pycache__", "-czf", str(out), pkg.name],
        check=True,
    )
    return out


def test_streamed_equals_gnu_tar_on_a_real_tree(tmp_path: Path) -> None:
    archive = _gnu_tar_of_real_tree(tmp_path)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    # -p: modes as the archive records them, which GNU tar does by default only for root and
    # forgespace does for every user (the umask is not applied: test_archive_member_rules)
    subprocess.run(["tar", "-C", str(gnu), "-xpzf", str(archive)], check=True)
    assert _stream(archive, tmp_path / "stream") is not None
    assert tree(tmp_path / "stream") == tree(gnu)


def test_a_zip_or_a_non_archive_is_not_streamed(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x.txt", "x")
    plain = tmp_path / "plain.gz"
    import gzip

    plain.write_bytes(gzip.compress(b"not a tar\n" * 100))
    broken = tmp_path / "broken.gz"  # a gzip magic, then nothing that inflates
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage after a gzip magic" * 20)
    for src in (z, plain, broken):
        assert _stream(src, tmp_path / "dest") is None
        assert not (tmp_path / "dest").exists()


def test_streamed_refusals_match_and_leave_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    good = tmp_path / "f.txt"
    good.write_text("ok\n")
    with tarfile.open(bad, "w") as tf:
        tf.add(good, "ok.txt")
        tf.add(good, "../out.txt")
    with pytest.raises(UnsafeArchiveError) as err:
        _stream(bad, tmp_path / "dest")
    assert err.value.member == "../out.txt" and err.value.archive == "streamed"
    assert not (tmp_path / "dest").exists() and not (tmp_path / "out.txt").exists()
    truncated = tmp_path / "cut.tgz"
    whole = build("tgz", make_source(tmp_path / "s"), tmp_path / "whole.tgz").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptArchiveError):
        _stream(truncated, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def _feed(part: PartFile, data: bytes, step: int, hold: threading.Event) -> None:
    """Write ``data`` in ``step``-sized pieces, pausing half-way until ``hold`` is set."""
    for i in range(0, len(data), step):
        if i >= len(data) // 2:
            hold.wait(30)
        part.write(data[i : i + step])


def test_the_tap_follows_a_file_being_written(tmp_path: Path, source: Path) -> None:
    """Extraction reads what the writer wrote so far, waits for more, and finishes once the
    download committed; the first half is extracted before the second half is written."""
    data = build("tgz", source, tmp_path / "a.tgz").read_bytes()
    tap = DownloadTap()
    part = PartFile(tmp_path / "target", tap)
    hold = threading.Event()
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(
            extract_tar_stream(tap, tmp_path / "ws", archive="t", max_bytes=MAX)
        )
    )
    t.start()
    writer = threading.Thread(target=_feed, args=(part, data, 256, hold))
    writer.start()
    for _ in range(600):
        if tap.pos > 0:  # the reader is consuming the first half while the writer waits
            break
        threading.Event().wait(0.05)
    assert tap.pos > 0 and t.is_alive()
    hold.set()
    writer.join()
    part.commit(ObjectInfo(size=len(data)), "t")
    t.join(30)
    tap.close()
    assert result and result[0] is not None
    ref = tmp_path / "ref"
    extract_archive(tmp_path / "target", ref, max_bytes=MAX)
    assert tree(tmp_path / "ws") == tree(ref)


@pytest.mark.parametrize("how", ["abort", "restart"])
def test_a_failed_or_restarted_download_stops_the_reader(tmp_path: Path, how: str) -> None:
    tap = DownloadTap()
    part = PartFile(tmp_path / "target", tap)
    part.write(b"x" * 1000)
    failed: list[BaseException] = []

    def read_all() -> None:
        try:
            while tap.read(4096):
                pass
        except DownloadStopped as exc:
            failed.append(exc)

    t = threading.Thread(target=read_all)
    t.start()
    if how == "abort":
        part.abort()
    else:
        part.restart()
    t.join(30)
    assert not t.is_alive() and failed
    part.abort()
    tap.close()
    shutil.rmtree(tmp_path / "ws", ignore_errors=True)
    assert not [n for n in os.listdir(tmp_path) if ".part-" in n]


def test_the_member_limit_holds_for_a_stream(tmp_path: Path) -> None:
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tf:
        for name in ("a", "b", "c"):
            tf.addfile(tarfile.TarInfo(name))
    assert _stream(many, tmp_path / "ok", max_members=3) is not None
    with pytest.raises(UnsafeArchiveError, match="above the limit of 2 members"):
        _stream(many, tmp_path / "dest", max_members=2)
    assert not (tmp_path / "dest").exists()
