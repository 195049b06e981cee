"""The streamed cold path (issue 17) against its baselines, measured side by side in one run.

A source-like tree is packed into a tar.gz (``upload_target``) and put in moto's S3 server and
a local store. Interleaved, every run into a fresh cache dir (nothing deleted between runs):

- raw GET: boto3 ``get_object`` streamed to a file (the wire alone);
- local: ``get_target`` (shared) from the local store (the extraction side alone, nearly);
- S3 streamed: ``get_target`` from S3, extracting while it downloads (cache/streamed.py);
- S3 sequential: the same with streaming off (download, then extract: the old path).

Goal: S3 streamed <= 1.15x max(raw GET, local). Then the same over a throttled link
(bench/throttle.py, a loopback proxy in its own process) whose rate is chosen so that the GET
takes about as long as the local get_target: there the sequential path costs their sum and
the streamed one should stay near the larger of the two.

Run: ``TMPDIR=/dev/shm .venv/bin/python bench/stream.py [--files 4000] [--mb 40] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import boto3  # noqa: E402
from _common import bench_root, cached, make_tree, print_table, throttled  # noqa: E402
from botocore.config import Config  # noqa: E402
from support.s3server import running_s3_server, s3_env  # noqa: E402

from forgespace.cache import streamed  # noqa: E402
from forgespace.cache.workspace import WorkspaceCache  # noqa: E402
from forgespace.config import Settings  # noqa: E402
from forgespace.storage.local import LocalStore  # noqa: E402
from forgespace.storage.s3 import S3Store  # noqa: E402


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Runs:
    """The four measurements against one endpoint; fresh cache dirs under ``work``."""

    def __init__(self, work: Path, settings: Settings, local_dir: Path, tid: str) -> None:
        self.work, self.settings, self.local_dir, self.tid = work, settings, local_dir, tid
        self.s3 = S3Store.from_settings(settings)
        self.raw = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        self.raw.head_bucket(Bucket=settings.s3_bucket)  # warm, like the store's client

    def _cache(self, store: object) -> WorkspaceCache:
        cache_dir = self.work / f"c-{uuid.uuid4().hex[:10]}"
        return WorkspaceCache(self.settings.with_(cache_dir=cache_dir), store=store)  # type: ignore[arg-type]

    def raw_get(self) -> float:
        def get() -> None:
            body = self.raw.get_object(Bucket=self.settings.s3_bucket, Key=f"{self.tid}/target")
            with open(self.work / f"raw-{uuid.uuid4().hex}", "wb") as f:
                for chunk in body["Body"].iter_chunks(1 << 20):
                    f.write(chunk)

        return _timed(get)

    def get(self, store: object, stream: bool) -> float:
        cache = self._cache(store)
        streamed.ENABLED = stream
        try:
            return _timed(lambda: cache.get_target(self.tid, None, "shared"))
        finally:
            streamed.ENABLED = True


def measure(runs: Runs, local: LocalStore, reps: int, label: str) -> dict[str, float]:
    times: dict[str, list[float]] = {"raw": [], "local": [], "streamed": [], "sequential": []}
    for rep in range(reps):  # interleaved: drift of the machine's load hits all alike
        times["raw"].append(runs.raw_get())
        times["local"].append(runs.get(local, True))
        times["streamed"].append(runs.get(runs.s3, True))
        times["sequential"].append(runs.get(runs.s3, False))
        print(f"  {label} rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()),
              flush=True)  # fmt: skip
    return {k: statistics.median(v) for k, v in times.items()}


def rows_for(label: str, m: dict[str, float]) -> list[list[str]]:
    floor = max(m["raw"], m["local"])
    total = m["raw"] + m["local"]
    return [
        [label, "raw GET to a file", f"{m['raw']:.2f}", "", ""],
        [label, "get_target, local store", f"{m['local']:.2f}", "", ""],
        [label, "get_target S3, streamed", f"{m['streamed']:.2f}",
         f"{m['streamed'] / floor:.2f}x", f"{m['streamed'] / total:.2f}x"],
        [label, "get_target S3, sequential", f"{m['sequential']:.2f}",
         f"{m['sequential'] / floor:.2f}x", f"{m['sequential'] / total:.2f}x"],
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rate", type=float, default=0.0, help="throttled MB/s (0: from local)")
    args = ap.parse_args()
    tree = cached(
        bench_root() / f"tree-{args.files}-{args.mb}mb",
        lambda p: make_tree(p, files=args.files, total_bytes=args.mb * 10**6),
    )
    work = Path(tempfile.mkdtemp(prefix="fs-bench-stream-"))
    try:
        run(args, tree, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, tree: Path, work: Path) -> None:
    """Both link speeds, then the table."""
    with running_s3_server(work) as server:
        settings = Settings.from_env(s3_env(server, work)).with_(s3_endpoint=server.upstream)
        local = LocalStore(work / "local", incremental=False)  # a tar.gz: what is streamed
        tid = local.upload_target(tree)
        S3Store.from_settings(settings).upload_target(local.object_path(tid), target_id=tid)
        size = local.stat_target(tid).size
        print(f"target {tid}: {size / 1e6:.1f} MB tar.gz of {args.files} files", flush=True)
        direct = measure(Runs(work, settings, work / "local", tid), local, args.reps, "direct")
        rate = args.rate or size / 1e6 / direct["local"]
        with throttled(server.upstream, rate) as endpoint:
            slow = Runs(work, settings.with_(s3_endpoint=endpoint), work / "local", tid)
            slowm = measure(slow, local, args.reps, f"{rate:.0f} MB/s")
    print_table(
        f"Cold shared get_target of a {size / 1e6:.0f} MB tar.gz ({args.files} files), "
        f"medians of {args.reps}; caches in {tempfile.gettempdir()}",
        ["link", "measure", "seconds", "vs max(GET, local)", "vs GET + local"],
        rows_for("moto direct", direct) + rows_for(f"throttled {rate:.0f} MB/s", slowm),
    )


if __name__ == "__main__":
    main()
