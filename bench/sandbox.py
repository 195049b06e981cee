"""Cost of the tool sandbox: per tool start (bwrap vs direct) and on a whole security scan.

Usage: .venv/bin/python bench/sandbox.py [--runs N] [--scans M] [--workflow-runs K]

1. Start overhead: ``/usr/bin/true`` and ``python -c pass`` (the worker's interpreter, as the
   bundled tools start) direct vs in the sandbox (``forgespace.sandbox``: prlimit + bwrap,
   the same binds a tool gets), median of N starts each, alternating.
2. ``security_assessment``'s work (``static_scan.assess``: bandit + the file scanner) over
   ``examples/vulnerable_app``, FORGESPACE_SANDBOX=none vs bwrap, median of M scans each,
   alternating. Temporal's part of a run is the same with and without and is left out.
3. A whole bundled workflow run, end to end: ``forgespace run security_assessment
   examples/vulnerable_app --json`` (embedded dev server, in-process worker, upload, download,
   scan, results, cleanup) in a fresh process and a fresh cache, FORGESPACE_SANDBOX=none vs bwrap,
   median of K each, alternating.
Goals: <= 50 ms per start, <= 5 % on the scan and on the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import median, print_table  # noqa: E402

from forgespace import sandbox  # noqa: E402
from forgespace.config import Settings  # noqa: E402
from forgespace.workflows._tools.static_scan import assess  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "vulnerable_app"


def start_once(box: sandbox.Sandbox, argv: list[str], ws: Path) -> float:
    t0 = time.perf_counter()
    done = box.run(argv, workspace=ws, writable=False, cwd=ws, timeout=60)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed: {done.stderr.decode()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--scans", type=int, default=5)
    ap.add_argument("--workflow-runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="forgespace-bench-sbx-") as tmp:
        settings = Settings.from_env({"CACHE_DIR": str(Path(tmp) / "cache")})
        boxes = {
            "direct": sandbox.configure(settings.with_(sandbox="none")),
            "bwrap": sandbox.configure(settings.with_(sandbox="bwrap")),
        }
        ws = Path(tmp) / "ws"
        shutil.copytree(EXAMPLE, ws)
        rows = []
        for label, argv in (
            ("/usr/bin/true", ["/usr/bin/true"]),
            ("python -c pass", [sys.executable, "-c", "pass"]),
        ):
            times: dict[str, list[float]] = {"direct": [], "bwrap": []}
            for i in range(args.runs):
                order = ("direct", "bwrap") if i % 2 == 0 else ("bwrap", "direct")
                for name in order:
                    times[name].append(start_once(boxes[name], argv, ws))
            d, b = median(times["direct"]), median(times["bwrap"])
            rows.append(
                [label, f"{d * 1000:.1f} ms", f"{b * 1000:.1f} ms", f"+{(b - d) * 1000:.1f} ms"]
            )
        print_table(
            f"Tool start, median of {args.runs} (`bench/sandbox.py`)",
            ["command", "direct", "sandboxed", "overhead per start"],
            rows,
        )

        scans: dict[str, list[float]] = {"direct": [], "bwrap": []}
        findings = set()
        for i in range(args.scans):
            order = ("direct", "bwrap") if i % 2 == 0 else ("bwrap", "direct")
            for name in order:
                sandbox._current = boxes[name]
                t0 = time.perf_counter()
                out = assess(ws)
                scans[name].append(time.perf_counter() - t0)
                findings.add(out["summary"]["total"])
        if len(findings) != 1:
            raise SystemExit(f"sandboxed and direct scans disagree: {findings}")
        d, b = median(scans["direct"]), median(scans["bwrap"])
        print_table(
            f"security_assessment scan of examples/vulnerable_app, median of {args.scans}",
            ["direct", "sandboxed", "ratio", "findings (both)"],
            [[f"{d:.3f} s", f"{b:.3f} s", f"{b / d:.3f}x", str(findings.pop())]],
        )
        if args.workflow_runs:
            whole_runs(Path(tmp), args.workflow_runs)
    subprocess.run(["bwrap", "--version"], check=False)


def whole_runs(tmp: Path, k: int) -> None:
    cli = Path(sys.executable).with_name("forgespace")
    times: dict[str, list[float]] = {"none": [], "bwrap": []}
    findings = set()
    for i in range(k):
        for mode in ("none", "bwrap") if i % 2 == 0 else ("bwrap", "none"):
            run_dir = tmp / f"run-{mode}-{i}"
            env = {
                **os.environ,
                "FORGESPACE_SANDBOX": mode,
                "CACHE_DIR": str(run_dir / "cache"),
                "STORAGE_DIR": str(run_dir / "store"),
            }
            env.pop("TEMPORAL_ADDRESS", None)
            t0 = time.perf_counter()
            done = subprocess.run(
                [str(cli), "run", "security_assessment", str(EXAMPLE), "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            times[mode].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise SystemExit(f"run with FORGESPACE_SANDBOX={mode} failed: {done.stderr}")
            [run] = json.loads(done.stdout)["runs"]
            findings.add(run["findings"])
    if len(findings) != 1:
        raise SystemExit(f"sandboxed and direct runs disagree: {findings}")
    d, b = median(times["none"]), median(times["bwrap"])
    print_table(
        f"forgespace run security_assessment examples/vulnerable_app, whole run, median of {k}",
        ["FORGESPACE_SANDBOX=none", "=bwrap", "ratio", "findings (both)"],
        [[f"{d:.2f} s", f"{b:.2f} s", f"{b / d:.3f}x", str(findings.pop())]],
    )


if __name__ == "__main__":
    main()
