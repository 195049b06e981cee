"""gc plan and `forgespace cache status` on a large cache: they must not walk workspace files.

A cache of ``--entries`` index entries (default 2,000: 60% shared workspaces, 20% copy-on-write
shared copies, 20% run directories) whose directories hold ``--files`` files in total (default
1,000,000). The files are hard links to a few empty files: creating a million inodes takes
minutes on this machine, a million directory entries ~10-20 s, and a walk (what gc and status
must avoid) costs the same for either. Built once under ``--dir`` and reused by later runs.

Timed (medians of ``--runs``), each against a baseline measured in the same run:

* ``plan_eviction`` (the gc plan: index read + listing the top two levels of CACHE_DIR) and a
  full ``gc --dry-run`` (plan + leftover scan), goal < 200 ms, versus ``du -s`` of the cache
  (what a walking gc would pay);
* ``forgespace cache status --json`` and ``cache ls --json`` as commands, end to end, goal
  < 300 ms, versus starting Python and importing the CLI (the floor of any command);
* the hit path's index write (``CacheIndex.access`` with a lease, one transaction), goal
  < 0.3 ms, versus a bare one-row UPDATE transaction on the same database.

Usage: ``.venv/bin/python bench/gc.py [--entries 2000] [--files 1000000] [--runs 9]``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from forgespace.cache.eviction import collect_garbage, plan_eviction
from forgespace.cache.index import CacheIndex, EntryRecord, scan_entries
from forgespace.config import Settings
from forgespace.layout import CacheLayout

LINKS_PER_SOURCE = 60_000  # ext4 allows 65,000 links per inode
FILES_PER_DIR = 100


def build(root: Path, entries: int, files: int, seed: int = 3) -> CacheLayout:
    """Create the on-disk entries and the index (skipped when already built)."""
    layout = CacheLayout(root / "cache")
    marker = root / f"built-{entries}-{files}"
    if marker.exists():
        return layout
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    # The index first, on an empty cache: opening it later over a populated cache with no
    # index would rebuild it by walking every file.
    index = CacheIndex(layout, lease_ttl=86400)
    pool = root / "pool"
    pool.mkdir()
    sources: list[str] = []
    rng = random.Random(seed)
    now = time.time()
    per_entry = files // entries
    made = 0
    t0 = time.perf_counter()
    for i in range(entries):
        tid = f"t{i:05d}"
        kind = ("shared", "shared", "shared", "cow-shared", "run")[i % 5]
        if kind == "shared":
            top = layout.shared_workspace(tid)
            key, run_id, mode = f"{tid}/workspace", None, "shared"
        elif kind == "cow-shared":
            top = layout.cow_shared_workspace(tid)
            key, run_id, mode = f"{tid}/shared", None, "copy-on-write"
        else:
            top = layout.run_workspace(tid, "run-1")
            key, run_id, mode = f"{tid}/run-1", "run-1", "isolated"
        n = per_entry + (1 if i < files % entries else 0)
        for j in range(n):
            if made % LINKS_PER_SOURCE == 0:
                src = pool / f"src{len(sources)}"
                src.touch()
                sources.append(str(src))
            d = top / f"d{j // FILES_PER_DIR}"
            if j % FILES_PER_DIR == 0:
                d.mkdir(parents=True)
            os.link(sources[-1], d / f"f{j % FILES_PER_DIR}.c")
            made += 1
        if kind == "shared":
            layout.shared_target(tid).touch()
        elif kind == "cow-shared":
            layout.cow_shared_target(tid).touch()
        # Spread over two weeks: with the default 7d TTL about half is due for eviction.
        last = now - rng.uniform(0, 14 * 86400)
        size = rng.randint(1, 50) * 10**6
        index.publish(EntryRecord(key, tid, kind, run_id, mode, size, n, last, last))
        if rng.random() < 0.1 or kind == "run":
            lease_id = key if kind == "run" else f"{key}#r{i}"
            index.add_lease(index.new_lease(lease_id, tid, run_id, (key,)))
        if (i + 1) % 200 == 0:
            print(f"  built {i + 1}/{entries} entries, {made} files", file=sys.stderr)
    print(f"  built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    marker.touch()
    return layout


class _Cache:
    """The parts of a WorkspaceCache that planning reads (no engine start-up in the loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = CacheLayout(settings.cache_dir)
        self.index = CacheIndex(self.layout, lease_ttl=settings.cache_lease_ttl)

    def target_lock(self, *a: object, **k: object) -> object:  # pragma: no cover - unused
        raise AssertionError("the benchmark never executes a plan")


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def command(args: list[str], env: dict[str, str]) -> Callable[[], object]:
    def run() -> None:
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)

    return run


def hit_path(entries: int, calls: int) -> tuple[float, float, float]:
    """(p50, p99) of CacheIndex.access with a lease on an index of ``entries``, and the p50 of
    a bare one-row UPDATE transaction on the same database (the floor of any useful commit)."""
    with tempfile.TemporaryDirectory() as d:
        index = CacheIndex(CacheLayout(Path(d)), lease_ttl=86400)
        now = time.time()
        for i in range(entries):
            key = f"t{i}/workspace"
            index.publish(EntryRecord(key, f"t{i}", "shared", None, "shared", 1, 1, now, now))
        times = []
        for n in range(calls):
            key = f"t{n % entries}/workspace"
            lease = index.new_lease(f"{key}#r{n}", f"t{n % entries}", f"r{n}", (key,))
            t0 = time.perf_counter()
            index.access(key, lease=lease, hit=True)
            times.append(time.perf_counter() - t0)
        conn = index._conn()
        empty = []
        for n in range(calls):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE entries SET last_access = ? WHERE key = ?",
                (time.time(), f"t{n % entries}/workspace"),
            )
            conn.execute("COMMIT")
            empty.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2], times[int(len(times) * 0.99)], statistics.median(empty)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--entries", type=int, default=2000)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("FORGESPACE_BENCH_DIR") or tempfile.gettempdir())
        / "forgespace-bench"
        / "gc",
    )
    a = ap.parse_args()
    layout = build(a.dir, a.entries, a.files)
    env = {**os.environ, "CACHE_DIR": str(layout.root), "STORAGE_DIR": str(a.dir / "store")}
    env.pop("FORGESPACE_LOG_LEVEL", None)
    settings = Settings.from_env(env).with_(cache_max_size=20 * 10**9)
    cache = _Cache(settings)
    entries = cache.index.entries()
    plan, total = plan_eviction(cache)
    reasons = {r: sum(1 for p in plan if p.reason == r) for r in ("ttl", "lru", "orphan")}
    print(
        f"cache: {len(entries)} entries, {total / 1e9:.1f} GB indexed, "
        f"{len(cache.index.live_leases())} live leases; plan evicts {len(plan)} {reasons}",
        file=sys.stderr,
    )
    runs = a.runs
    t_plan = median_time(lambda: plan_eviction(cache), runs)
    t_dry = median_time(lambda: collect_garbage(cache, dry_run=True), runs)  # type: ignore[arg-type]
    t_du = median_time(command(["du", "-s", str(layout.root)], env), max(3, runs // 3))
    exe = str(Path(sys.executable).parent / "forgespace")
    cli = [exe] if os.path.exists(exe) else [sys.executable, "-m", "forgespace.cli"]
    # The floor of any command: start Python and import the CLI (typer, rich, our modules).
    floor = "import forgespace.cli"
    # Interleaved (floor, status, ls, floor, status, ...) so that all three see the same
    # machine load: on a shared machine the load drifts within seconds.
    cmd_times: dict[str, list[float]] = {"floor": [], "status": [], "ls": []}
    cmds = {
        "floor": command([sys.executable, "-c", floor], env),
        "status": command([*cli, "cache", "status", "--json"], env),
        "ls": command([*cli, "cache", "ls", "--json"], env),
    }
    for _ in range(runs):
        for name, fn in cmds.items():
            cmd_times[name].append(median_time(fn, 1))
    t_floor, t_status, t_ls = (statistics.median(cmd_times[k]) for k in ("floor", "status", "ls"))
    from forgespace.cli.cache_cmds import status_doc

    t_status_work = median_time(
        lambda: status_doc(settings, CacheIndex(layout, lease_ttl=settings.cache_lease_ttl)), runs
    )
    t0 = time.perf_counter()
    scanned = scan_entries(layout)
    t_scan = time.perf_counter() - t0

    hit50, hit99, empty_tx = hit_path(a.entries, 2000)

    def ms(x: float) -> str:
        return f"{x * 1000:.3f} ms" if x < 0.01 else f"{x * 1000:.1f} ms"

    walk = "`du -s` walk"
    floor_name = "CLI floor (start python, import the CLI)"
    rows = [
        ("gc plan (plan_eviction)", ms(t_plan), "< 200 ms", walk, ms(t_du), t_plan / t_du),
        ("gc --dry-run (plan + leftovers)", ms(t_dry), "< 200 ms", walk, ms(t_du), t_dry / t_du),
        ("`forgespace cache status --json`", ms(t_status), "< 300 ms", floor_name, ms(t_floor),
         t_status / t_floor),
        ("status work in-process (open index, build doc)", ms(t_status_work), "-", floor_name,
         ms(t_floor), t_status_work / t_floor),
        ("`forgespace cache ls --json`", ms(t_ls), "-", floor_name, ms(t_floor), t_ls / t_floor),
        ("hit path `CacheIndex.access` with a lease, p50", ms(hit50), "< 0.3 ms",
         "bare one-row UPDATE transaction", ms(empty_tx), hit50 / empty_tx),
        ("hit path `CacheIndex.access` with a lease, p99", ms(hit99), "-",
         "bare one-row UPDATE transaction", ms(empty_tx), hit99 / empty_tx),
        ("index rebuild scan (walks every file, 1x)", ms(t_scan), "-", walk, ms(t_du),
         t_scan / t_du),
    ]  # fmt: skip
    print(
        f"\n{len(entries)} entries, {sum(e.files for e in scanned)} files on disk, "
        f"median of {runs} runs\n"
    )
    print("| measured | median | goal | baseline | baseline median | ratio |")
    print("|---|---|---|---|---|---|")
    for name, t, goal, base, tb, ratio in rows:
        print(f"| {name} | {t} | {goal} | {base} | {tb} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
