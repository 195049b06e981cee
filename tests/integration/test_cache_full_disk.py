"""A cache filesystem filled to the brim: hits are served, status/ls/gc/evict work, a get that
must download fails with CacheFullError, and the index is never taken for corrupt (not moved
aside, leases and counters kept). Real tmpfs, the real command in subprocesses.

Two ways the disk fills: after every process closed the index (the next opener must create
its -wal/-shm files and cannot: it reads through a read-only connection), and while another
process holds it open (its -shm is there; writes fail with SQLITE_FULL).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import assert_one_line_error, cli_env, run_forgespace
from support.mounts import MountRefused, fill_to_the_brim, tmpfs
from support.procs import make_project
from support.s3server import env_for

from forgespace.cache import index as index_mod
from forgespace.cache.index import CacheIndex
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.errors import CacheFullError
from forgespace.layout import CacheLayout

pytestmark = pytest.mark.integration


@dataclass
class FullCache:
    cache_dir: Path
    mnt: Path
    env: dict[str, str]
    settings: Settings
    ids: dict[str, str]
    paths: dict[str, str]
    leases: set[str]
    counters: dict[str, int]
    index_ino: int

    def fill(self) -> None:
        fill_to_the_brim(self.mnt)
        assert os.statvfs(self.mnt).f_bavail == 0

    def free(self) -> None:
        (self.mnt / "filler").unlink(missing_ok=True)


@pytest.fixture(params=["index closed", "index held open"])
def full_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FullCache]:
    """A cache on an 8 MiB tmpfs with: target a (shared with a run's lease, a copy-on-write
    run, an isolated run), b (an isolated run whose lease ended: gc's orphan) and e (an
    unleased shared workspace: for evict). The disk is not filled yet."""
    try:
        with tmpfs(tmp_path / "fs", size="8m") as mnt:
            settings = Settings.from_env(
                {"CACHE_DIR": str(mnt / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
            )
            cache = WorkspaceCache(settings)
            ids = {
                n: cache.store.upload_target(make_project(tmp_path / n, files=8, seed=n))
                for n in "aben"
            }
            a, b, e = ids["a"], ids["b"], ids["e"]
            paths = {
                "shared": cache.get_target(a, "ra", "shared"),
                "copy-on-write": cache.get_target(a, "rc", "copy-on-write"),
                "isolated": cache.get_target(a, "ri", "isolated"),
            }
            cache.get_target(b, "rb", "isolated")
            cache.index.end_lease(f"{b}/rb")
            cache.get_target(e, None, "shared")
            leases = {le.lease_id for le in cache.index.live_leases()}
            assert leases == {f"{a}/workspace#ra", f"{a}/rc", f"{a}/ri"}
            held = request.param == "index held open"
            if not held:
                cache.index.close()  # the last close checkpoints and removes -wal and -shm
                assert not os.path.exists(f"{cache.index.path}-shm")
            yield FullCache(
                settings.cache_dir, mnt, cli_env(env_for(settings)), settings, ids, paths,
                leases, cache.index.counters(), os.stat(cache.index.path).st_ino,
            )  # fmt: skip
            cache.index.close()
    except MountRefused as exc:
        pytest.skip(f"tmpfs mount unavailable: {exc}")


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line]


def test_everything_an_operator_needs_works_on_a_full_disk(full_cache: FullCache) -> None:
    fc = full_cache
    a, b, e, n = (fc.ids[k] for k in "aben")
    run_of = {"shared": "ra", "copy-on-write": "rc", "isolated": "ri"}

    # hits, in all three modes: served, exit 0, one warning per process
    for mode, rid in run_of.items():
        fc.fill()
        proc = run_forgespace(fc.env, "get", a, "--run-id", rid, "--isolation", mode)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == fc.paths[mode]
        assert len(_warnings(proc.stderr)) == 1, proc.stderr
        assert "Traceback" not in proc.stderr

    # a get that must download: CacheFullError, one line, nothing created
    fc.fill()
    proc = run_forgespace(fc.env, "get", n, "--run-id", "rn")
    assert_one_line_error(proc, 1, "no space left on device", str(fc.cache_dir))
    assert not (fc.cache_dir / n).exists()

    fc.fill()
    proc = run_forgespace(fc.env, "cache", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["entries"] == 6 and status["live_leases"] == 3
    assert status["downloads"] == fc.counters["downloads"]

    fc.fill()
    proc = run_forgespace(fc.env, "cache", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {t["target_id"] for t in json.loads(proc.stdout)["targets"]} == {a, b, e}

    # gc frees the disk: it deletes first and records what it can
    fc.fill()
    proc = run_forgespace(fc.env, "cache", "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"{b}/rb" in {x["key"] for x in json.loads(proc.stdout)["evicted"]}
    assert not (fc.cache_dir / b / "rb").exists()

    fc.fill()
    proc = run_forgespace(fc.env, "cache", "evict", e)
    assert proc.returncode == 0, proc.stderr
    assert not (fc.cache_dir / e).exists()

    # space back: the same index file (never moved aside), its leases and counters intact
    fc.free()
    meta = fc.cache_dir / ".forgespace"
    assert not list(meta.glob("index.sqlite.corrupt*"))
    assert os.stat(meta / "index.sqlite").st_ino == fc.index_ino
    index = CacheIndex(CacheLayout(fc.cache_dir), lease_ttl=fc.settings.cache_lease_ttl)
    assert {le.lease_id for le in index.live_leases()} == fc.leases
    assert index.counters()["downloads"] == fc.counters["downloads"]
    # whatever gc/evict could not record on the full disk, the next gc reconciles from disk
    assert run_forgespace(fc.env, "cache", "gc").returncode == 0
    assert {x.key for x in index.entries()} == {
        f"{a}/workspace",
        f"{a}/shared",
        f"{a}/rc",
        f"{a}/ri",
    }
    index.close()


def test_a_full_disk_warns_once_per_process_not_per_hit(
    full_cache: FullCache, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = full_cache
    a = fc.ids["a"]
    monkeypatch.setattr(index_mod, "_warned_pid", -1)
    cache = WorkspaceCache(fc.settings)
    fc.fill()
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        for _ in range(20):
            assert cache.get_target(a, "ra", "shared") == fc.paths["shared"]
            assert cache.get_target(a, "ri", "isolated") == fc.paths["isolated"]
        with pytest.raises(CacheFullError):
            cache.get_target(fc.ids["n"], "rn", "isolated")
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    fc.free()
    # the warning was about the state, not the file: writes resume once there is room
    cache.get_target(a, "ra", "shared")
    assert cache.index.counters().get("hits", 0) >= 1
    cache.index.close()
