"""Benchmark incremental targets (manifest + blob packs) against the classic whole-archive path,
both measured in the same run, through S3 behind the counting test proxy: moto, or with
``--server s3rver`` the second implementation (Node, serves ranges from its files; ``npm
install --prefix bench``), so a ratio is not an artefact of one server's quirks.

A source-like tree (``--files`` / ``--mb``, default 20,000 files / 300 MB) is version 1; three
version 2s change one file, 1% of the files and 20% of the files (each changed file gets new
bytes in front). For each path (classic: ``{id}/target`` is one tar.gz; incremental: the
default) it measures:

- the first upload of version 1 and a cold ``get_target`` of it (shared mode, empty cache);
- an isolated ``get_target`` of version 1 on the host that now holds it shared;
- for each version 2: the upload, and a ``get_target`` on the host that holds version 1;
- an unchanged re-upload of version 1.

Bytes are what the proxy saw: request bodies sent (uploads) and response bodies served
(downloads), all keys together (an upload's "down" bytes are the pack indexes it reads). A
second table gives each step's CPU seconds in this process (all threads, the proxy's too).
Nothing is deleted between timed runs (each one makes a new target or cache entry), and each
starts with the page cache written back (``os.sync``), both paths alike.

Each path's caches are removed (and written back) before the other path runs, and the two
paths take turns going first.

Run: ``.venv/bin/python bench/incremental.py [--files 20000 --mb 300] [--reps 3] [--server s3rver]
[--ballast N]``
(``--quick``: 2,000 files / 30 MB). Seconds are medians over the repetitions, each with fresh
buckets and caches; classic and incremental runs alternate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    S3RVER,
    bench_root,
    cached,
    caches_root,
    make_tree,
    print_table,
    running_s3rver,
    throttled,
)
from support.s3server import S3Server, proxied, running_s3_server, s3_env  # noqa: E402

from forgespace import Settings, WorkspaceCache  # noqa: E402
from forgespace.storage.s3 import S3Store  # noqa: E402

VARIANTS = (("1 file", 0.0), ("1% of files", 0.01), ("20% of files", 0.20))


def _variant(v1: Path, dest: Path, share: float, tag: str) -> Path:
    """A copy of ``v1`` with one file (share 0) or ``share`` of its files changed."""
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(v1, tmp, symlinks=True)
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
    n = max(1, int(len(files) * share))
    for p in random.Random(tag).sample(files, n):
        p.write_bytes(f"changed in {tag}\n".encode() + p.read_bytes())
    tmp.rename(dest)
    return dest


def _io(server: S3Server) -> tuple[int, int]:
    """(bytes sent to the server, bytes served by it) so far."""
    with server._lock:
        return sum(server._received.values()), sum(server._served.values())


def _measure(server: S3Server, fn: Callable[[], Any]) -> tuple[float, int, int, Any, float]:
    """(seconds, bytes sent, bytes served, what ``fn`` returned, CPU seconds of this process:
    every thread, the counting proxy's included, not moto's). Each step starts with the page
    cache written back (``os.sync``), as on a host where the previous step happened a while
    ago: otherwise a snapshot of version 1 taken right after its get waits for btrfs to write
    back its 300 MB first, a cost of the benchmark's back-to-back steps, not of the path."""
    os.sync()
    s0, r0 = _io(server)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    cpu = time.process_time() - c0
    s1, r1 = _io(server)
    return secs, s1 - s0, r1 - r0, out, cpu


def _run_path(
    server: S3Server, work: Path, name: str, trees: dict[str, Path], endpoint: str | None
) -> dict[str, Any]:
    """Every measurement for one path (``name``: classic or incremental); ``endpoint``: a
    throttled way to the server (downloads slowed, uploads not)."""
    env = {**s3_env(server, work), "CACHE_DIR": str(work / f"cache-{name}")}
    if endpoint is not None:
        env["S3_ENDPOINT"] = endpoint
    settings = Settings.from_env(env)
    store = S3Store.from_settings(settings)
    store.incremental = name == "incremental"
    cache = WorkspaceCache(settings, store=store)
    res: dict[str, Any] = {}
    res["upload v1"] = _measure(server, lambda: store.upload_target(trees["v1"]))
    tid1 = res["upload v1"][3]
    res["get v1"] = _measure(server, lambda: cache.get_target(tid1, None, "shared"))
    # a fuzzer's run of the target a scanner holds shared on this host: the classic path
    # downloads it again; the incremental one copies the sealed tree's files (btrfs)
    res["isolated v1"] = _measure(server, lambda: cache.get_target(tid1, "run", "isolated"))
    for label, _share in VARIANTS:
        up = _measure(server, lambda label=label: store.upload_target(trees[label]))
        res[f"upload {label}"] = up
        res[f"get {label}"] = _measure(
            server, lambda tid=up[3]: cache.get_target(tid, None, "shared")
        )
    res["re-upload v1"] = _measure(server, lambda: store.upload_target(trees["v1"]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="2,000 files / 30 MB")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (median seconds)")
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="MB/s of a throttled link for downloads (bench/throttle.py; 0: loopback speed)",
    )
    ap.add_argument(
        "--fs",
        choices=("btrfs", "tmp"),
        default="btrfs",
        help="where caches are written: a loop-mounted btrfs made for the run (default, as "
        "bench/get_target.py: immune to the root ext4's slow creates after deletes) or the "
        "temp dir",
    )
    ap.add_argument(
        "--server",
        choices=("moto", "s3rver"),
        default="moto",
        help="the S3 implementation behind the counting proxy (s3rver: npm install --prefix bench)",
    )
    ap.add_argument(
        "--ballast",
        type=int,
        default=0,
        help="copies of version 1 written to the caches' filesystem first and kept for the run: "
        "both paths measured on a filesystem that already holds data (0: an empty one)",
    )
    args = ap.parse_args()
    if args.server == "s3rver" and not S3RVER.exists():
        sys.exit(f"s3rver not found at {S3RVER}: run `npm install --prefix bench`")
    files, mb = (2000, 30) if args.quick else (args.files, args.mb)
    base = bench_root() / f"incr-{files}-{mb}MB"
    v1 = cached(base / "v1", lambda p: make_tree(p, files=files, total_bytes=mb << 20))
    trees = {"v1": v1}
    for label, share in VARIANTS:
        tag = label.split()[0].replace("%", "pct")
        trees[label] = cached(base / f"v2-{tag}", lambda p, s=share, t=tag: _variant(v1, p, s, t))
    runs: list[dict[str, dict[str, Any]]] = []
    with contextlib.ExitStack() as stack:
        fs_root = caches_root(stack, args.fs, Path(tempfile.gettempdir()))
        work = Path(tempfile.mkdtemp(prefix="forgespace-bench-incr-", dir=fs_root))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        for i in range(args.ballast):
            shutil.copytree(v1, work / f"ballast-{i}", symlinks=True)
        os.sync()
        with _server(args.server, work) as server:
            endpoint = None
            if args.rate:  # through the counting proxy, so bytes are still counted
                endpoint = stack.enter_context(throttled(server.endpoint, args.rate))
            for rep in range(args.reps):  # interleaved: load drift hits both paths alike
                run: dict[str, dict[str, Any]] = {}
                for n in PATHS if rep % 2 == 0 else PATHS[::-1]:  # either path first in turn
                    run[n] = _run_path(server, work / f"{n}-{rep}", n, trees, endpoint)
                    # each path starts on the same empty filesystem, not on the other's caches
                    shutil.rmtree(work / f"{n}-{rep}", ignore_errors=True)
                    os.sync()
                runs.append(run)
    _report(_medians(runs), files, mb, args.reps, args.server)
    print(
        f"server: {args.server}; caches on: {args.fs}; "
        f"downloads: {f'{args.rate:g} MB/s' if args.rate else 'loopback'}; "
        f"ballast: {args.ballast} x {mb} MB"
    )


@contextlib.contextmanager
def _server(name: str, work: Path) -> Iterator[S3Server]:
    """moto or s3rver on 127.0.0.1, behind the counting proxy, for the block."""
    if name == "moto":
        with running_s3_server(work) as server:
            yield server
        return
    # its objects in memory as moto keeps them (tmpfs), not on the caches' filesystem, where
    # its writes would compete with the gets being measured
    shm = Path("/dev/shm")
    data = Path(tempfile.mkdtemp(prefix="forgespace-s3rver-", dir=shm if shm.is_dir() else None))
    try:
        with running_s3rver(S3RVER, data) as endpoint:
            port = int(endpoint.rsplit(":", 1)[1])
            with proxied(port, access_key="S3RVER", secret_key="S3RVER") as server:
                yield server
    finally:
        shutil.rmtree(data, ignore_errors=True)


PATHS = ("classic", "incremental")


def _medians(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per path and step: median seconds and CPU seconds; bytes of the first run (they do not
    vary)."""
    out: dict[str, dict[str, Any]] = {}
    for n in PATHS:
        out[n] = {}
        for step, (_s, up, down, _o, _c) in runs[0][n].items():
            secs = statistics.median(r[n][step][0] for r in runs)
            cpu = statistics.median(r[n][step][4] for r in runs)
            out[n][step] = (secs, up, down, None, cpu)
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _report(
    results: dict[str, dict[str, Any]], files: int, mb: int, reps: int, server: str
) -> None:
    c, i = results["classic"], results["incremental"]
    rows = []
    cpu_rows = []
    for step in c:
        cs, cu, cd, _, cc = c[step]
        is_, iu, id_, _, ic = i[step]
        up = f"{iu / cu:.3f}" if cu else "-"
        down = f"{id_ / cd:.3f}" if cd else "-"
        rows.append([step, _mb(cu), _mb(iu), up, _mb(cd), _mb(id_), down,
                     f"{cs:.2f}", f"{is_:.2f}", f"{is_ / cs:.2f}x"])  # fmt: skip
        cpu_rows.append([step, f"{cc:.2f}", f"{ic:.2f}", f"{ic / cc:.2f}x" if cc else "-"])
    print_table(
        f"Incremental vs classic targets, {files} files / {mb} MB, S3 ({server} via the proxy), "
        f"median of {reps}",
        ["step", "MB up classic", "MB up incr.", "up ratio", "MB down classic",
         "MB down incr.", "down ratio", "s classic", "s incr.", "time ratio"],
        rows,
    )  # fmt: skip
    # CPU seconds of the benchmark process: steadier than wall time on a loaded machine
    # (other jobs stretch both, not always alike), blind to time spent waiting on the wire.
    print_table(
        f"CPU seconds of the client process (all its threads), median of {reps}",
        ["step", "CPU s classic", "CPU s incr.", "CPU ratio"],
        cpu_rows,
    )


if __name__ == "__main__":
    main()
