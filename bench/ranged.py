"""Does a parallel ranged download beat one streamed GET? Measured on two S3 implementations.

For each object size, side by side in one run (interleaved, median of ``--reps``):

- one streamed GET to a file (raw boto3 ``get_object``; no hashing: the floor);
- ``S3Store.download_target`` (one GET, sha256 overlapped, temp file + rename);
- boto3 ``download_file`` with parallel ranged GETs (8 MiB parts, 4 and 8 at a time).

Servers: moto (Python; every ranged GET re-reads the whole object, so ranges are expensive
there) and s3rver from npm (Node; serves ranges from its files), both on 127.0.0.1 with the
data on tmpfs when ``TMPDIR`` points there. Install s3rver first:
``npm install --prefix bench`` (bench/package.json), or pass ``--s3rver PATH``.

Run: ``.venv/bin/python bench/ranged.py [--sizes 16,64,200] [--reps 3] [--servers moto,s3rver]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import boto3  # noqa: E402
from _common import S3RVER, median, print_table, running_s3rver  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402
from support.s3server import running_s3_server, s3_env  # noqa: E402

from forgespace.config import Settings  # noqa: E402
from forgespace.storage.s3 import S3Store  # noqa: E402

MiB = 1 << 20


def _settings(endpoint: str, work: Path, access: str, secret: str) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return Settings.from_env(
        {
            "CACHE_DIR": str(work / "cache"),
            "STORAGE_DIR": str(work / "store"),
            "STORAGE_BACKEND": "s3",
            "S3_ENDPOINT": endpoint,
            "S3_ACCESS_KEY": access,
            "S3_SECRET_KEY": secret,
            "S3_BUCKET": f"targets-{suffix}",
            "S3_RESULTS_BUCKET": f"results-{suffix}",
        }
    )


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_server(name: str, settings: Settings, work: Path, sizes: list[int], reps: int) -> str:
    store = S3Store.from_settings(settings)
    raw = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )
    out = work / f"out-{name}"
    out.mkdir()
    rows: list[list[str]] = []
    for mb in sizes:
        src = work / f"object-{mb}.bin"
        block = os.urandom(MiB)
        with open(src, "wb") as f:
            for i in range(mb):
                f.write(i.to_bytes(4, "big") + block[4:])
        tid = store.upload_target(src)
        key = f"{tid}/target"

        def raw_get(key: str = key) -> None:
            body = raw.get_object(Bucket=settings.s3_bucket, Key=key)["Body"]
            with open(out / f"raw-{uuid.uuid4().hex}", "wb") as f:
                for chunk in body.iter_chunks(MiB):
                    f.write(chunk)

        def ranged(n: int, key: str = key) -> Callable[[], None]:
            cfg = TransferConfig(
                multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=n
            )
            return lambda: raw.download_file(
                settings.s3_bucket, key, str(out / f"mp-{uuid.uuid4().hex}"), Config=cfg
            )

        methods: dict[str, Callable[[], object]] = {
            "one GET (raw boto3, baseline)": raw_get,
            "download_target (one GET, sha256)": lambda tid=tid: store.download_target(
                tid, out / f"fs-{uuid.uuid4().hex}"
            ),
            "ranged GETs x4 (8 MiB parts)": ranged(4),
            "ranged GETs x8 (8 MiB parts)": ranged(8),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(reps):
            for m, fn in methods.items():
                times[m].append(_timed(fn))
        base = median(times["one GET (raw boto3, baseline)"])
        for m in methods:
            t = median(times[m])
            rows.append([name, str(mb), m, f"{t:.3f}", f"{mb / t:.0f}", f"{t / base:.2f}x"])
        shutil.rmtree(out)
        out.mkdir()
        src.unlink()
    return print_table(
        f"{name}: one GET vs parallel ranged GETs, median of {reps}",
        ["server", "MB", "method", "seconds", "MB/s", "vs one GET"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,200", help="object sizes in MB, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="moto,s3rver")
    ap.add_argument(
        "--s3rver",
        type=Path,
        default=S3RVER,
        help="the s3rver executable (npm install --prefix bench)",
    )
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    servers = args.servers.split(",")
    work = Path(tempfile.mkdtemp(prefix="forgespace-bench-ranged-"))
    try:
        if "moto" in servers:
            with _moto(work) as settings:
                bench_server("moto", settings, work, sizes, args.reps)
        if "s3rver" in servers:
            if not args.s3rver.exists():
                sys.exit(f"s3rver not found at {args.s3rver}: run `npm install --prefix bench`")
            with running_s3rver(args.s3rver, work / "s3rver-data") as endpoint:
                settings = _settings(endpoint, work, "S3RVER", "S3RVER")
                bench_server("s3rver", settings, work, sizes, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _moto(work: Path) -> Iterator[Settings]:
    (work / "moto").mkdir()
    with running_s3_server(work / "moto") as server:
        # straight to moto: the test proxy's threads would share this process's GIL
        yield Settings.from_env(s3_env(server, work)).with_(s3_endpoint=server.upstream)


if __name__ == "__main__":
    main()
