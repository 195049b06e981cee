"""Shared helpers for the archive / clone benchmarks: cached data generation, timing, tables.

Data lives under a temp directory (``FORGESPACE_BENCH_DIR`` or ``$TMPDIR/forgespace-bench``) and
is generated once: reruns reuse it. Timed runs never delete between runs (the root ext4 here has
no journal and creating files right after deleting many is 10-30x slower); every run writes to a
fresh destination name and everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "def class return import from self None True False if else elif for while in not and or "
    "try except finally with as yield lambda pass break continue raise assert global int str "
    "bytes list dict set tuple len range print open read write path value result error config "
    "buffer offset size count index name data node tree parse token lexer fuzz crash input "
    "target workspace cache store run member header archive extract stream chunk block"
).split()


def bench_root() -> Path:
    """The cached benchmark data directory (created on demand)."""
    root = Path(
        os.environ.get("FORGESPACE_BENCH_DIR") or Path(tempfile.gettempdir()) / "forgespace-bench"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def _text_corpus(rng: random.Random, size: int) -> bytes:
    lines: list[str] = []
    total = 0
    while total < size:
        indent = " " * (4 * rng.randrange(4))
        line = indent + " ".join(rng.choices(WORDS, k=rng.randrange(3, 12))) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def make_tree(root: Path, *, files: int, total_bytes: int, seed: int = 7) -> Path:
    """Write a source-tree-like directory: nested dirs, text-like and binary files, exec bits,
    a few internal symlinks. Deterministic for a seed. Returns ``root``."""
    rng = random.Random(seed)
    corpus = _text_corpus(rng, 8 << 20)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ndirs = max(1, files // 20)
    dirs = [Path(".")]
    for i in range(ndirs):
        parent = rng.choice(dirs[: 1 + len(dirs) // 2])
        d = parent / f"dir{i:04d}"
        (tmp / d).mkdir()
        dirs.append(d)
    # Log-normal sizes scaled so the total is close to total_bytes.
    raw = [rng.lognormvariate(0, 1.2) for _ in range(files)]
    scale = total_bytes / sum(raw)
    for i, r in enumerate(raw):
        size = max(0, int(r * scale))
        rel = rng.choice(dirs) / f"file{i:05d}{rng.choice(['.py', '.c', '.txt', '.json', '.bin'])}"
        if rng.random() < 0.2:
            data = os.urandom(size)
        else:
            off = rng.randrange(0, len(corpus) - min(size, len(corpus) - 1))
            data = (f"# {rel}\n".encode() + corpus[off : off + size])[:size]
            while len(data) < size:
                data += corpus[: size - len(data)]
        p = tmp / rel
        p.write_bytes(data)
        if rng.random() < 0.05:
            p.chmod(0o755)
    for j in range(min(20, files // 1000 + 1)):
        d = rng.choice(dirs[1:] or dirs)
        os.symlink(f"../{d.name}" if d.parent != Path(".") else ".", tmp / d / f"link{j}")
    tmp.rename(root)
    return root


def make_big_file_tree(root: Path, *, sizes: Sequence[int], seed: int = 11) -> Path:
    """A directory of a few large files (half text-like, half random). Returns ``root``."""
    rng = random.Random(seed)
    corpus = _text_corpus(rng, 8 << 20)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for i, size in enumerate(sizes):
        with open(tmp / f"big{i}.bin", "wb") as f:
            written = 0
            while written < size:
                n = min(4 << 20, size - written)
                f.write(os.urandom(n // 2) + corpus[: n - n // 2])
                written += n
    tmp.rename(root)
    return root


def cached(path: Path, build: Callable[[Path], object]) -> Path:
    """Return ``path``, building it with ``build(path)`` first when it does not exist yet."""
    if not path.exists():
        t0 = time.perf_counter()
        print(f"  generating {path.name} ...", flush=True)
        build(path)
        print(f"  generated {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def tar_gz(src_dir: Path, out: Path) -> Path:
    """Pack ``src_dir``'s contents into ``out`` with GNU tar + gzip (default level)."""
    tmp = out.with_name(out.name + ".partial")
    subprocess.run(["tar", "-C", str(src_dir), "-czf", str(tmp), "."], check=True)
    tmp.rename(out)
    return out


def drop_page_cache_hint(path: Path) -> None:
    """Warm the page cache for ``path`` so the first timed run does not pay the disk read."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def child_peak_rss_mb() -> float:
    """Peak RSS of waited-for children (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Print (and return) a Markdown table, noting the machine's load average (it is shared)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"### {title}",
        "",
        f"load average at the end: {load} on {os.cpu_count()} CPUs",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


@contextlib.contextmanager
def throttled(upstream: str, mb_per_s: float) -> Iterator[str]:
    """An endpoint reaching ``upstream`` (http://host:port) at ``mb_per_s`` MB/s."""
    hostport = upstream.split("://", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("throttle.py")), hostport, str(mb_per_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{proc.stdout.readline().strip()}"
    finally:
        proc.kill()
        proc.wait()


def caches_root(stack: contextlib.ExitStack, fs: str, fallback: Path) -> Path:
    """Where a benchmark writes its caches: with ``fs`` "btrfs", a loop-mounted btrfs made for
    the run (unmounted when ``stack`` closes; immune to the root ext4's slow creates after
    deletes), else ``fallback`` (also when loop mounts are refused here: said on stdout)."""
    if fs != "btrfs":
        return fallback
    from support.mounts import MountRefused, loop_btrfs

    try:
        root: Path = stack.enter_context(loop_btrfs(bench_root() / "loop", size=8 << 30))
    except MountRefused as exc:
        print(f"no loop btrfs ({exc}); caches on {fallback}", flush=True)
        return fallback
    print(f"caches on a loop-mounted btrfs at {root}", flush=True)
    return root


# the second S3 implementation (Node): `npm install --prefix bench` (bench/package.json)
S3RVER = Path(__file__).resolve().parent / "node_modules" / ".bin" / "s3rver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_s3rver(exe: Path, data: Path) -> Iterator[str]:
    """s3rver on 127.0.0.1 (a free port) for the block; yields its endpoint."""
    port = _free_port()
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(exe), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "-s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s3rver ({exe}) did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
