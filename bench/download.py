"""Benchmark the object stores against their baselines, measured side by side in one run.

1. S3 download of one large object (moto behind the test proxy): ``S3Store.download_target``
   (one streamed GET, sha256 verified, temp file + rename) vs a raw boto3 ``get_object``
   streamed to a file (no hashing, the floor) and boto3's ``download_file`` (multipart
   ranged GETs: what a naive client would use; moto re-reads the object for every range).
   Peak RSS growth of a ``download_target`` in a fresh process is reported too.
2. Packing a directory (``upload_target`` of a dir) vs ``tar --sort=name -czf`` (GNU tar +
   gzip) on a generated source-like tree.

Run: ``.venv/bin/python bench/download.py [--mb 200] [--reps 3] [--files 5000 --tree-mb 100]
[--only s3|pack] [--direct]`` (``--direct``: S3 clients talk to moto without the test proxy,
whose threads would share the benchmark process's GIL).
Timed runs never delete in between (every run writes to a fresh name; cleanup at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import boto3  # noqa: E402
from _common import bench_root, cached, make_tree, median, print_table, throttled  # noqa: E402
from botocore.config import Config  # noqa: E402
from support.s3server import env_for, running_s3_server, s3_env  # noqa: E402

from forgespace.config import Settings  # noqa: E402
from forgespace.storage.pack import pack_to_file  # noqa: E402
from forgespace.storage.s3 import S3Store  # noqa: E402

_RSS_CHILD = """
import resource, sys
from forgespace.config import Settings
from forgespace.storage import open_store
store = open_store(Settings.from_env())
store.stat_target(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
store.download_target(sys.argv[1], sys.argv[2])
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def bench_s3(work: Path, mb: int, reps: int, direct: bool = False, rate: float = 0.0) -> str:
    with running_s3_server(work) as server, contextlib.ExitStack() as stack:
        settings = Settings.from_env(s3_env(server, work))
        if direct:
            # straight to moto: the test proxy's threads share this process's GIL
            settings = settings.with_(s3_endpoint=server.upstream)
        if rate:
            # a link slower than loopback (bench/throttle.py, its own process): reads wait for
            # the wire, so a hash beside them is hidden if it overlaps and added if it does not
            ep = stack.enter_context(throttled(settings.s3_endpoint or server.upstream, rate))
            settings = settings.with_(s3_endpoint=ep)
        store = S3Store.from_settings(settings)
        src = work / "object.bin"
        block = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for i in range(mb):
                f.write(i.to_bytes(4, "big") + block[4:])
        tid = store.upload_target(src)
        key = f"{tid}/target"
        raw = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        out = work / "out"
        out.mkdir()

        def raw_get() -> None:
            body = raw.get_object(Bucket=settings.s3_bucket, Key=key)["Body"]
            with open(out / f"raw-{uuid.uuid4().hex}", "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    f.write(chunk)

        def multipart() -> None:
            raw.download_file(settings.s3_bucket, key, str(out / f"mp-{uuid.uuid4().hex}"))

        def ours() -> None:
            store.download_target(tid, out / f"fs-{uuid.uuid4().hex}")

        times: dict[str, list[float]] = {"raw": [], "multipart": [], "ours": []}
        for _ in range(reps):  # interleaved, so drift hits all three alike
            times["raw"].append(_timed(raw_get))
            times["ours"].append(_timed(ours))
            times["multipart"].append(_timed(multipart))
        before_kb, after_kb = (
            int(x)
            for x in subprocess.run(
                [sys.executable, "-c", _RSS_CHILD, tid, str(out / "rss")],
                env=env_for(settings),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        )
    base = median(times["raw"])
    rows = []
    for name, label in (
        ("raw", "boto3 get_object streamed to a file (baseline)"),
        ("ours", "S3Store.download_target (1 GET, sha256, temp+rename)"),
        ("multipart", "boto3 download_file (multipart ranged GETs)"),
    ):
        m = median(times[name])
        rows.append([label, f"{m:.2f}", f"{mb / m:.0f}", f"{m / base:.2f}x"])
    table = print_table(
        f"S3 download of a {mb} MB object (moto{'' if direct else ' via the proxy'}"
        f"{f', throttled to {rate:g} MB/s' if rate else ''}), "
        f"median of {reps}",
        ["method", "seconds", "MB/s", "vs baseline"],
        rows,
    )
    note = (
        f"\nPeak RSS of a fresh process: {before_kb / 1024:.0f} MB after imports and client, "
        f"{after_kb / 1024:.0f} MB after download_target of the {mb} MB object.\n"
    )
    print(note)
    table += note
    return table


def bench_pack(work: Path, files: int, tree_mb: int, reps: int) -> str:
    tree = cached(
        bench_root() / f"tree-{files}-{tree_mb}MB",
        lambda p: make_tree(p, files=files, total_bytes=tree_mb << 20),
    )
    gnu: list[float] = []
    ours: list[float] = []
    sizes: dict[str, int] = {}
    for i in range(reps):
        dest = work / f"gnu-{i}.tar.gz"
        gnu.append(
            _timed(
                lambda dest=dest: subprocess.run(
                    ["tar", "--sort=name", "-czf", str(dest), "-C", str(tree), "."],
                    check=True,
                )
            )
        )
        sizes["gnu"] = dest.stat().st_size
        dest = work / f"ours-{i}.tar.gz"
        ours.append(_timed(lambda dest=dest: pack_to_file(tree, dest)))
        sizes["ours"] = dest.stat().st_size
    base = median(gnu)
    return print_table(
        f"Packing a {files}-file / {tree_mb} MB tree, median of {reps}",
        ["method", "seconds", "archive MB", "vs baseline"],
        [
            [
                "GNU tar --sort=name -czf (baseline)",
                f"{base:.2f}",
                f"{sizes['gnu'] / 1e6:.0f}",
                "1.00x",
            ],
            [
                "pack_to_file (deterministic, isal level 1, fsync)",
                f"{median(ours):.2f}",
                f"{sizes['ours'] / 1e6:.0f}",
                f"{median(ours) / base:.2f}x",
            ],
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="object size for the S3 download")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--tree-mb", type=int, default=100)
    ap.add_argument(
        "--direct", action="store_true", help="S3 clients talk to moto without the test proxy"
    )
    ap.add_argument(
        "--only", choices=("s3", "pack"), default=None, help="run one of the two benchmarks"
    )
    ap.add_argument(
        "--rate", type=float, default=0.0, help="S3 over a link throttled to MB/s (0: loopback)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forgespace-bench-dl-"))
    try:
        if args.only in (None, "s3"):
            bench_s3(work, args.mb, args.reps, args.direct, args.rate)
        if args.only in (None, "pack"):
            bench_pack(work, args.files, args.tree_mb, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
