"""Benchmark get_target against its baselines, measured side by side in one run.

1. 16 concurrent shared get_target (16 OS processes, released together) on a cold cache over
   S3 (moto behind the counting proxy): object GETs must be 1; wall time vs one single
   get_target measured the same way.
2. Hot shared hit (lease included) on a 20k-file workspace: p50 / p99, vs the unsafe anchor's
   hit (an existence check only).
3. Cold get_target (download + extract + publish) vs a raw boto3 download of the same object
   plus GNU tar extraction.

Run: ``.venv/bin/python bench/get_target.py [--files 20000] [--mb 100] [--reps 3]``.
No deletion between timed runs (every run writes to fresh directories; all removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import bench_root, cached, caches_root, make_tree, print_table  # noqa: E402
from support.procs import run_getters  # noqa: E402
from support.s3server import env_for, running_s3_server, s3_env  # noqa: E402

from forgespace.cache.workspace import WorkspaceCache  # noqa: E402
from forgespace.config import Settings  # noqa: E402


def _settings(server: object, work: Path, name: str, bucket_env: dict[str, str]) -> Settings:
    env = dict(bucket_env)
    env["CACHE_DIR"] = str(work / name / "cache")
    return Settings.from_env(env)


def concurrent_cold(
    server: object, work: Path, base_env: dict[str, str], tid: str, n: int
) -> tuple[float, int, int]:
    """(wall seconds from release to the last return, GETs of the object, downloads)."""
    settings = _settings(server, work, f"conc{n}-{uuid.uuid4().hex[:6]}", base_env)
    key = f"{settings.s3_bucket}/{tid}/target"
    before = server.get_count(key)  # type: ignore[attr-defined]
    calls = [(tid, f"r{i}", "shared") for i in range(n)]
    results = run_getters(env_for(settings), calls, work, timeout=600, digest=False)
    errors = [r for r in results if "error" in r]
    if errors:
        raise SystemExit(f"get_target failed: {errors[0]}")
    gets = server.get_count(key) - before  # type: ignore[attr-defined]
    wall = max(float(r["seconds"]) for r in results)
    return wall, gets, sum(bool(r["downloaded"]) for r in results)


def hot_hits(cache: WorkspaceCache, tid: str, n: int) -> tuple[float, float, float, float]:
    """(p50, p99) of a shared hit with lease, and (p50, p99) of the unsafe anchor, seconds."""
    cache.get_target(tid, None, "shared")
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        cache.get_target(tid, f"hot-{i}", "shared")
        lat.append(time.perf_counter() - t0)
    ws = cache.layout.shared_workspace(tid)
    anchor = []
    for _ in range(n):
        t0 = time.perf_counter()
        # what the unsafe platform does on a hit: the directory exists -> use it
        _ = ws.exists() and str(ws)
        anchor.append(time.perf_counter() - t0)

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return pct(lat, 0.5), pct(lat, 0.99), pct(anchor, 0.5), pct(anchor, 0.99)


def raw_baseline(settings: Settings, tid: str, dest: Path) -> float:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
    )
    s3.head_bucket(Bucket=settings.s3_bucket)  # warm the client like the store's
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    body = s3.get_object(Bucket=settings.s3_bucket, Key=f"{tid}/target")["Body"]
    with open(dest / "target", "wb") as f:
        shutil.copyfileobj(body, f, 1 << 20)
    (dest / "workspace").mkdir()
    subprocess.run(["tar", "-xzf", str(dest / "target"), "-C", str(dest / "workspace")], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hits", type=int, default=5000)
    ap.add_argument(
        "--fs",
        choices=("btrfs", "tmp"),
        default="btrfs",
        help="where caches are written: a loop-mounted btrfs made for the run (default; immune "
        "to the journal-less root ext4's slow creates after deletes) or the temp dir",
    )
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        fs_root = caches_root(stack, args.fs, bench_root())
        run(args, fs_root)


def run(args: argparse.Namespace, fs_root: Path) -> None:
    """The three measurements with caches under ``fs_root``."""

    tree = cached(
        bench_root() / f"tree-{args.files}-{args.mb}mb",
        lambda p: make_tree(p, files=args.files, total_bytes=args.mb * 10**6),
    )
    work = Path(tempfile.mkdtemp(prefix="fs-bench-get-", dir=fs_root))
    try:
        with running_s3_server(work) as server:
            # the archive path (a tar.gz object), as the baselines (boto3 + GNU tar) read it;
            # incremental targets have their own benchmark, bench/incremental.py
            base_env = {**s3_env(server, work), "STORE_FORMAT": "archive"}
            settings = Settings.from_env(base_env)
            uploader = WorkspaceCache(settings)
            t0 = time.perf_counter()
            tid = uploader.store.upload_target(tree)
            size = uploader.store.stat_target(tid).size
            print(f"uploaded {args.files} files as {size / 1e6:.1f} MB in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

            # 1. concurrency: interleave single and N-way runs, fresh cache dirs each time
            singles, multis, gets, downloads = [], [], [], []
            for _ in range(args.reps):
                w1, _, _ = concurrent_cold(server, work, base_env, tid, 1)
                wn, gn, dn = concurrent_cold(server, work, base_env, tid, args.concurrency)
                singles.append(w1)
                multis.append(wn)
                gets.append(gn)
                downloads.append(dn)
                print(f"  single {w1:.2f} s, {args.concurrency}-way {wn:.2f} s, GETs {gn}",
                      flush=True)  # fmt: skip

            # 3. cold in-process get vs raw boto3 + GNU tar (interleaved)
            colds, raws = [], []
            for i in range(args.reps):
                s = _settings(server, work, f"cold{i}", base_env)
                cache = WorkspaceCache(s, store=uploader.store)
                t0 = time.perf_counter()
                cache.get_target(tid, None, "shared")
                colds.append(time.perf_counter() - t0)
                raws.append(raw_baseline(s, tid, work / f"raw{i}"))
                print(f"  cold get {colds[-1]:.2f} s, boto3+tar {raws[-1]:.2f} s", flush=True)

            # 2. hot hits on the last cold cache (20k-file workspace)
            p50, p99, a50, a99 = hot_hits(cache, tid, args.hits)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    rows = [
        [f"{args.concurrency} concurrent cold shared gets (S3), wall", f"{med(multis):.2f} s",
         f"1 get_target {med(singles):.2f} s", f"{med(multis) / med(singles):.2f}x", "<= 1.2x"],
        [f"object GETs for {args.concurrency} concurrent gets", str(max(gets)), "1",
         f"{max(gets)}", "== 1"],
        ["hot shared hit + lease, p50", f"{p50 * 1e3:.3f} ms", f"anchor {a50 * 1e6:.1f} us",
         f"{p50 / a50:.0f}x", "<= 0.5 ms"],
        ["hot shared hit + lease, p99", f"{p99 * 1e3:.3f} ms", f"anchor {a99 * 1e6:.1f} us",
         f"{p99 / a99:.0f}x", "<= 5 ms"],
        [f"cold get_target ({size / 1e6:.0f} MB, {args.files} files)", f"{med(colds):.2f} s",
         f"boto3 + GNU tar {med(raws):.2f} s", f"{med(colds) / med(raws):.2f}x", "<= 1.2x"],
    ]  # fmt: skip
    print_table(
        f"get_target (medians of {args.reps}; downloads per N-way run: {downloads})",
        ["measure", "forgespace", "baseline", "ratio", "goal"],
        rows,
    )
    print(json.dumps({"concurrent_ratio": med(multis) / med(singles), "gets": max(gets),
                      "hit_p50_ms": p50 * 1e3, "hit_p99_ms": p99 * 1e3,
                      "cold_ratio": med(colds) / med(raws)}))  # fmt: skip


if __name__ == "__main__":
    main()
