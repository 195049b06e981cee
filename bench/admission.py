"""Waiter admission: 16 processes asking at once for one small local target vs one process.

Each run uses a fresh cache dir over the local store: one process downloads, extracts and
publishes (~0.25 s for the default tree); the other 15 wait on the target's shared lock and are
admitted when it publishes, each recording its lease in one index write transaction. Single and
16-way runs are interleaved; the wall time is the slowest process's get_target from the release
barrier (support.procs.run_getters). ``spread`` is how long after the publisher the last waiter
returned.

``--compare-src DIR``: also run the children on another checkout's ``src`` (e.g. the code before
the change, ``git archive <rev> src | tar -x -C DIR``), interleaved with this one.

``--index-only``: the admission alone, without the download and extraction whose time varies
most on a loaded machine: N-1 processes wait for a shared lock that this process holds
exclusively (``locks.flock``, as waiters do on the target lock), then each records its lease
(``CacheIndex.access``) once the lock is released. Reported: from the release to the last
lease recorded.

Run: ``.venv/bin/python bench/admission.py [--files 1500] [--reps 7] [--n 16] [--index-only]``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import bench_root, cached, make_tree, print_table  # noqa: E402
from support.procs import run_getters  # noqa: E402
from support.s3server import env_for  # noqa: E402

from forgespace.config import Settings  # noqa: E402
from forgespace.storage.local import LocalStore  # noqa: E402


def one_round(
    store_dir: Path, work: Path, tid: str, n: int, src: str | None
) -> tuple[float, float, float]:
    """(wall of the slowest process, the publisher's own time, spread after it), seconds."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(work / f"c-{uuid.uuid4().hex[:8]}"), "STORAGE_DIR": str(store_dir)}
    )
    extra = {"PYTHONPATH": src} if src else None
    calls = [(tid, f"r{i}", "shared") for i in range(n)]
    res = run_getters(env_for(settings), calls, work, timeout=300, extra_env=extra, digest=False)
    errors = [r for r in res if "error" in r]
    if errors:
        raise SystemExit(f"get_target failed: {errors[0]}")
    times = [float(r["seconds"]) for r in res]
    publisher = next(float(r["seconds"]) for r in res if r["downloaded"])
    return max(times), publisher, max(times) - publisher


_WAITER = """
import sys, time
from pathlib import Path
from forgespace.cache.index import CacheIndex
from forgespace.cache.locks import flock
from forgespace.layout import CacheLayout
idx = CacheIndex(CacheLayout(Path(sys.argv[1])), lease_ttl=3600)
lease = idx.new_lease("t/workspace#" + sys.argv[3], "t", sys.argv[3], ("t/workspace",))
print("READY", flush=True)
with flock(Path(sys.argv[2]), exclusive=False, timeout=60, what="target t"):
    idx.access("t/workspace", lease=lease, hit=True)
print(time.time(), flush=True)
"""


def index_round(work: Path, n: int) -> float:
    """Seconds from releasing the lock to the last of ``n - 1`` waiters' leases recorded."""
    from forgespace.cache.index import CacheIndex, EntryRecord
    from forgespace.layout import CacheLayout

    root = work / f"i-{uuid.uuid4().hex[:8]}"
    idx = CacheIndex(CacheLayout(root), lease_ttl=3600)
    idx.publish(EntryRecord("t/workspace", "t", "shared", None, "shared", 1, 1, 0.0, 0.0))
    lock = root / "lock"
    lock.write_text("")
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    procs = [
        subprocess.Popen([sys.executable, "-c", _WAITER, str(root), str(lock), f"r{i}"],
                         stdout=subprocess.PIPE, text=True)
        for i in range(n - 1)
    ]  # fmt: skip
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "READY\n"
    import time

    time.sleep(0.5)  # every waiter is waiting for the lock by now
    t0 = time.time()
    fcntl.flock(fd, fcntl.LOCK_UN)
    ends = [float(p.communicate(timeout=60)[0].strip()) for p in procs]
    os.close(fd)
    assert len(idx.live_leases()) == n - 1
    return max(ends) - t0


def index_only(n: int, reps: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="fs-bench-admission-"))
    got: list[float] = []
    try:
        for rep in range(reps):
            got.append(index_round(work, n))
            print(f"  rep {rep}: {got[-1] * 1e3:.1f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"{n - 1} waiters released together, each recording its lease (of {reps} runs)",
        ["release -> last lease recorded, median", "min", "max"],
        [[f"{statistics.median(got) * 1e3:.1f} ms", f"{min(got) * 1e3:.1f} ms",
          f"{max(got) * 1e3:.1f} ms"]],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1500)
    ap.add_argument("--mb", type=int, default=6)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--compare-src", default=None, help="another checkout's src directory")
    ap.add_argument("--index-only", action="store_true", help="the lease admission alone")
    args = ap.parse_args()
    if args.index_only:
        index_only(args.n, args.reps)
        return
    tree = cached(
        bench_root() / f"tree-{args.files}-{args.mb}mb",
        lambda p: make_tree(p, files=args.files, total_bytes=args.mb * 10**6),
    )
    work = Path(tempfile.mkdtemp(prefix="fs-bench-admission-"))
    variants = {"this": None} if not args.compare_src else {"this": None, "other": args.compare_src}
    walls: dict[tuple[str, int], list[float]] = {}
    spreads: dict[str, list[float]] = {k: [] for k in variants}
    try:
        store_dir = work / "store"
        tid = LocalStore(store_dir).upload_target(tree)
        for rep in range(args.reps):
            for name, src in variants.items():
                for n in (1, args.n):
                    wall, _, spread = one_round(store_dir, work, tid, n, src)
                    walls.setdefault((name, n), []).append(wall)
                    if n > 1:
                        spreads[name].append(spread)
                    print(f"  rep {rep} {name} n={n}: {wall:.3f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    rows = []
    for name in variants:
        one, many = med(walls[(name, 1)]), med(walls[(name, args.n)])
        label = "this checkout" if name == "this" else f"--compare-src {args.compare_src}"
        rows.append([label, f"{one:.3f} s", f"{many:.3f} s", f"{many / one:.2f}x",
                     f"{med(spreads[name]) * 1e3:.0f} ms", "<= 1.2x"])  # fmt: skip
    print_table(
        f"{args.n} concurrent cold shared gets of a local {args.files}-file target "
        f"(medians of {args.reps})",
        ["code", "1 process", f"{args.n} processes", "ratio", "spread after publisher", "goal"],
        rows,
    )


if __name__ == "__main__":
    main()
