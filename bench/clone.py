"""Copy-on-write materialisation: our copy backend vs ``cp -a`` vs shutil.copytree, on the
bench temp dir's filesystem (the root ext4 here), on a fresh ext4 loop mount (steadier: the root
ext4 has no journal and is shared) and on a btrfs loop mount; overlay mount cost per run.

Usage: .venv/bin/python bench/clone.py [--runs N] [--quick] [--no-btrfs] [--no-ext4-loop]

Data (generated once, cached in the bench temp dir): a source-tree-like directory of ~300 MB /
20k files (``--quick``: ~60 MB / 4k) and, on btrfs, two 200 MB files (``--quick``: 2 x 50 MB).
Every timed copy goes to a fresh destination name and nothing is deleted until all runs are
done (the root ext4 here has no journal: creating files right after deleting many is 10-30x
slower). The order of the contenders rotates between runs. Copies are not fsync'ed by any
contender (page-cache speed, as a run would see it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import bench_root, cached, make_big_file_tree, make_tree, median, print_table  # noqa: E402
from support.mounts import MountRefused, loop_btrfs, loop_fs  # noqa: E402

from forgespace.cache.clone import materialize_copy  # noqa: E402
from forgespace.cache.overlay import mount_overlay, unmount  # noqa: E402

Contender = Callable[[Path, Path], str]


def cp_a(src: Path, dst: Path) -> str:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return "cp -a"


def ours(src: Path, dst: Path) -> str:
    return materialize_copy(src, dst).method


def copytree(src: Path, dst: Path) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return "copy2"


CONTENDERS: dict[str, Contender] = {
    "cp -a": cp_a,
    "materialize_copy": ours,
    "shutil.copytree": copytree,
}


def race(
    src: Path, work: Path, runs: int, names: list[str], tag: str
) -> dict[str, tuple[float, str]]:
    times: dict[str, list[float]] = {n: [] for n in names}
    how: dict[str, str] = {}
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            dst = work / f"{tag}-{n.replace(' ', '_')}-{i}"
            t0 = time.perf_counter()
            how[n] = CONTENDERS[n](src, dst)
            times[n].append(time.perf_counter() - t0)
        line = ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names)
        print(f"  {tag} run {i + 1}: {line}", flush=True)
    return {n: (median(times[n]), how[n]) for n in names}


def rows_vs(results: dict[str, tuple[float, str]], base: str) -> list[list[str]]:
    b = results[base][0]
    return [[n, f"{t:.3f}", f"**{t / b:.2f}x**", how] for n, (t, how) in results.items()]


@contextlib.contextmanager
def scratch(parent: Path, name: str) -> Iterator[Path]:
    d = parent / f"{name}-{os.getpid()}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fstype(path: Path) -> str:
    r = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)], capture_output=True, text=True
    )
    return r.stdout.strip() or "unknown"


def overlay_costs(lower: Path, work: Path, runs: int) -> list[list[str]]:
    rows = []
    for label, use_binary in (("mount(2) via ctypes", False), ("`mount -t overlay` binary", True)):
        t_mount, t_umount = [], []
        for i in range(runs):
            base = work / f"ov-{int(use_binary)}-{i}"
            up, wk, mnt = base / "upper", base / "work", base / "mnt"
            for d in (up, wk, mnt):
                d.mkdir(parents=True)
            t0 = time.perf_counter()
            if use_binary:
                opts = f"lowerdir={lower},upperdir={up},workdir={wk}"
                subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True
                )
            else:
                mount_overlay(lower, up, wk, mnt)
            t1 = time.perf_counter()
            (mnt / "run-marker").write_text("x")  # a run writes something
            t2 = time.perf_counter()
            if use_binary:
                subprocess.run(["umount", str(mnt)], check=True)
            else:
                unmount(mnt)
            t3 = time.perf_counter()
            t_mount.append(t1 - t0)
            t_umount.append(t3 - t2)
        m, u = median(t_mount) * 1000, median(t_umount) * 1000
        rows.append([label, f"{m:.2f}", f"{u:.2f}", f"**{m + u:.2f}**"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller data, 3 runs")
    ap.add_argument("--no-btrfs", action="store_true", help="skip the btrfs loop-mount part")
    ap.add_argument("--no-ext4-loop", action="store_true", help="skip the ext4 loop-mount part")
    args = ap.parse_args()
    runs = 3 if args.quick and args.runs == 5 else args.runs
    root = bench_root()
    nfiles, total, big = (
        (4000, 60_000_000, 50_000_000) if args.quick else (20000, 300_000_000, 200_000_000)
    )
    tree = cached(root / f"tree-{nfiles}", lambda p: make_tree(p, files=nfiles, total_bytes=total))
    names = list(CONTENDERS)
    out = []

    with scratch(root, "runs-clone") as work:
        res = race(tree, work, runs, names, "tempdir")
        out.append(
            print_table(
                f"{nfiles} files / {total / 1e6:.0f} MB in the bench temp dir ({fstype(work)}, the"
                f" root filesystem; median of {runs})",
                ["contender", "seconds", "vs cp -a", "method"],
                rows_vs(res, "cp -a"),
            )
        )
        ov_runs = 10 if args.quick else 30
        out.append(
            print_table(
                f"overlay per run over the {nfiles}-file tree (median of {ov_runs}, ms)",
                ["mount with", "mount", "write + unmount", "total"],
                overlay_costs(tree, work, ov_runs),
            )
        )

    if not args.no_ext4_loop:
        try:
            with loop_fs(root / f"ext4-{os.getpid()}", "ext4", size=12 << 30) as mnt:
                src = mnt / "tree"
                subprocess.run(["cp", "-a", str(tree), str(src)], check=True)
                subprocess.run(["sync"], check=True)
                res = race(src, mnt, runs, names, "ext4-loop")
                out.append(
                    print_table(
                        f"{nfiles} files / {total / 1e6:.0f} MB on a fresh ext4 loop mount"
                        f" (median of {runs})",
                        ["contender", "seconds", "vs cp -a", "method"],
                        rows_vs(res, "cp -a"),
                    )
                )
        except MountRefused as e:
            print(f"ext4 loop part skipped: {e}")

    if not args.no_btrfs:
        try:
            with loop_btrfs(root / f"btrfs-{os.getpid()}", size=12 << 30) as mnt:
                src = mnt / "tree"
                subprocess.run(["cp", "-a", str(tree), str(src)], check=True)
                subprocess.run(["sync"], check=True)
                res = race(src, mnt, runs, names, "btrfs")
                out.append(
                    print_table(
                        f"{nfiles} files / {total / 1e6:.0f} MB on a btrfs loop mount"
                        f" (median of {runs})",
                        ["contender", "seconds", "vs cp -a", "method"],
                        rows_vs(res, "cp -a"),
                    )
                )
                bigsrc = make_big_file_tree(mnt / "big", sizes=[big, big])
                subprocess.run(["sync"], check=True)
                res = race(
                    bigsrc, mnt, runs, ["shutil.copytree", "materialize_copy", "cp -a"], "big"
                )
                ours_t = res["materialize_copy"][0]
                rows = [
                    [n, f"{t:.4f}", f"**{res['shutil.copytree'][0] / t:.0f}x**", how]
                    for n, (t, how) in res.items()
                ]
                out.append(
                    print_table(
                        f"2 x {big / 1e6:.0f} MB on a btrfs loop mount (median of {runs})",
                        ["contender", "seconds", "copytree / this", "method"],
                        rows,
                    )
                )
                print(f"  materialize_copy of 2 x {big / 1e6:.0f} MB: {ours_t * 1000:.1f} ms")
        except MountRefused as e:
            print(f"btrfs part skipped: {e}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
