"""Waiter admission across real processes (issue 17): the waiters of a download are granted the
target lock together by the kernel (locks.flock waits in a blocking flock, not by polling) and
then record their leases at once. Every lease is recorded, each by the run that took it, and a
writer that holds the index's write lock for a while delays the others without failing them."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import make_project, run_getters

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration

N = 16

_HAMMER = """
import sys, time
from pathlib import Path
from forgespace.cache.index import CacheIndex
from forgespace.config import Settings
from forgespace.layout import CacheLayout

settings = Settings.from_env()
idx = CacheIndex(CacheLayout(settings.cache_dir), lease_ttl=3600)
me, rounds, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
print("READY", flush=True)
while not go.exists():
    time.sleep(0.001)
for i in range(rounds):
    lease = idx.new_lease(f"t/workspace#{me}-{i}", "t", f"{me}-{i}", ("t/workspace",))
    idx.access("t/workspace", lease=lease, hit=True)
print("DONE", flush=True)
"""

_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def test_sixteen_processes_waiting_for_one_download_all_record_their_lease(
    tmp_path: Path, settings_env: Callable[[Settings], dict[str, str]]
) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "p", files=400, size=2000))
    calls = [(tid, f"run-{i}", "shared") for i in range(N)]
    results = run_getters(settings_env(settings), calls, tmp_path, timeout=120, digest=False)
    assert not [r for r in results if "error" in r], results
    assert sum(bool(r["downloaded"]) for r in results) == 1
    leases = {lease.lease_id: lease for lease in cache.index.live_leases()}
    assert set(leases) == {f"{tid}/workspace#run-{i}" for i in range(N)}
    for i in range(N):  # each lease is its own run's, pinning the shared workspace
        lease = leases[f"{tid}/workspace#run-{i}"]
        assert lease.run_id == f"run-{i}" and lease.pins == (f"{tid}/workspace",)
    assert len({lease.holder for lease in leases.values()}) == N  # one holder per process
    c = cache.index.counters()
    assert c.get("hits", 0) + c.get("misses", 0) == N


def test_contended_writers_all_land_while_one_holds_the_lock(
    tmp_path: Path, settings_env: Callable[[Settings], dict[str, str]]
) -> None:
    """8 processes write 40 leases each while another process holds the write lock for 1 s
    at the start: every write waits (none fails with a lock timeout) and all 320 land."""
    settings = Settings.from_env({"CACHE_DIR": str(tmp_path / "cache")})
    cache = WorkspaceCache(settings)
    from forgespace.cache.index import EntryRecord

    now = time.time()
    cache.index.publish(EntryRecord("t/workspace", "t", "shared", None, "shared", 1, 1, now, now))
    env = settings_env(settings)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(cache.layout.index_path), "1.0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, f"p{i}", "40", str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "READY\n"
        go.write_text("go")
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "DONE" in out, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.wait(30)
    ids = {lease.lease_id for lease in cache.index.live_leases()}
    assert ids == {f"t/workspace#p{i}-{j}" for i in range(8) for j in range(40)}
    assert cache.index.counters().get("hits") == 320
