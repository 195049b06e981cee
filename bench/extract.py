"""Safe extraction vs GNU ``tar -xzf``: time ratio and peak memory.

Usage: .venv/bin/python bench/extract.py [--runs N] [--quick] [--on tempdir|ext4-loop|btrfs]

Archives (generated once, cached in the bench temp dir): a source-tree-like tar.gz of ~300 MB /
20k files (``--quick``: ~60 MB / 4k files) and a tar.gz holding one 200 MB file (``--quick``:
50 MB). Each run extracts with GNU tar and with ``forgespace.cache.archive.extract_archive``
(every safety check on) into fresh directories — alternating which goes first, deleting nothing
until all runs are done. Our extraction runs in a child process so its peak RSS is its own; its
time is measured inside the child (interpreter start-up excluded). ``--on`` picks where the
extractions go: the bench temp dir (default; the root filesystem), or a fresh ext4 / btrfs loop
mount made for the run (steadier on this machine, whose root ext4 has no journal and is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import (  # noqa: E402
    bench_root,
    cached,
    drop_page_cache_hint,
    make_big_file_tree,
    make_tree,
    median,
    print_table,
    tar_gz,
)
from support.mounts import loop_fs  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from forgespace.cache.archive import extract_archive
t0 = time.perf_counter()
st = extract_archive(sys.argv[1], sys.argv[2], max_bytes=10**12)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"secs": dt, "rss_mb": rss, "files": st.files, "bytes": st.bytes}))
"""

BASELINE_RSS = r"""
import json, resource
import forgespace.cache.archive
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def ours(archive: Path, dest: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(archive), str(dest)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def gnu(archive: Path, dest: Path) -> float:
    dest.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller archives, 3 runs")
    ap.add_argument("--on", choices=["tempdir", "ext4-loop", "btrfs"], default="tempdir")
    args = ap.parse_args()
    runs = 3 if args.quick and args.runs == 5 else args.runs
    root = bench_root()
    nfiles, total, big = (
        (4000, 60_000_000, 50_000_000) if args.quick else (20000, 300_000_000, 200_000_000)
    )
    tree = cached(root / f"tree-{nfiles}", lambda p: make_tree(p, files=nfiles, total_bytes=total))
    tgz = cached(root / f"tree-{nfiles}.tar.gz", lambda p: tar_gz(tree, p))
    one = cached(root / f"single-{big}", lambda p: make_big_file_tree(p, sizes=[big]))
    one_tgz = cached(root / f"single-{big}.tar.gz", lambda p: tar_gz(one, p))

    with contextlib.ExitStack() as stack:
        if args.on == "tempdir":
            work = root / f"runs-extract-{os.getpid()}"
            work.mkdir()
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        else:
            fs = "ext4" if args.on == "ext4-loop" else "btrfs"
            work = stack.enter_context(
                loop_fs(root / f"extract-{fs}-{os.getpid()}", fs, size=16 << 30)
            )
        run_all(args, runs, work, nfiles, total, big, tgz, one_tgz)


def run_all(
    args: argparse.Namespace,
    runs: int,
    work: Path,
    nfiles: int,
    total: int,
    big: int,
    tgz: Path,
    one_tgz: Path,
) -> None:
    base_rss = json.loads(
        subprocess.run(
            [sys.executable, "-c", BASELINE_RSS], check=True, capture_output=True, text=True
        ).stdout
    )["rss_mb"]
    rows = []
    for label, archive in (
        (f"{nfiles} files, {total / 1e6:.0f} MB", tgz),
        (f"1 file, {big / 1e6:.0f} MB", one_tgz),
    ):
        drop_page_cache_hint(archive)
        t_gnu, t_ours, rss = [], [], []
        for i in range(runs):
            order = ("gnu", "ours") if i % 2 == 0 else ("ours", "gnu")
            for who in order:
                dest = work / f"{archive.name}-{who}-{i}"
                if who == "gnu":
                    t_gnu.append(gnu(archive, dest))
                else:
                    r = ours(archive, dest)
                    t_ours.append(r["secs"])
                    rss.append(r["rss_mb"])
            print(
                f"  {label} run {i + 1}: gnu {t_gnu[-1]:.3f} s, ours {t_ours[-1]:.3f} s",
                flush=True,
            )
        g, o = median(t_gnu), median(t_ours)
        rows.append(
            [
                label,
                f"{archive.stat().st_size / 1e6:.0f} MB",
                f"{g:.3f}",
                f"{o:.3f}",
                f"**{o / g:.2f}x**",
                f"{max(rss):.0f} MB ({max(rss) - base_rss:.0f} MB above import)",
            ]
        )
    print_table(
        f"Safe extraction vs GNU tar -xzf, extracting into {args.on} (median of {runs} runs)",
        ["archive", "tar.gz size", "GNU tar s", "ours s", "ours / GNU", "our peak RSS"],
        rows,
    )


if __name__ == "__main__":
    main()
