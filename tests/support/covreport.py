"""Line and branch coverage per package, and overall, from coverage's JSON report.

``python tests/support/covreport.py .coverage-data/coverage.json`` (``make coverage`` runs it
last). Packages are the directories below ``src/forgespace`` (``workflows`` with its tools; the
top-level modules count as ``forgespace``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import PurePosixPath


def package_of(path: str) -> str:
    parts = PurePosixPath(path).parts
    i = parts.index("forgespace")
    rest = parts[i + 1 : -1]
    return rest[0] if rest else "forgespace"


def main(report: str) -> None:
    with open(report) as f:
        files = json.load(f)["files"]
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for path, data in files.items():
        s = data["summary"]
        row = sums[package_of(path)]
        row[0] += s["covered_lines"]
        row[1] += s["num_statements"]
        row[2] += s["covered_branches"]
        row[3] += s["num_branches"]
    total = [sum(col) for col in zip(*sums.values(), strict=True)]
    print(f"{'package':<12} {'lines':>16} {'branches':>16}")
    for name, (cl, nl, cb, nb) in [*sorted(sums.items()), ("TOTAL", total)]:
        lines = f"{100 * cl / max(nl, 1):5.1f} % of {nl:>5}"
        branches = f"{100 * cb / max(nb, 1):5.1f} % of {nb:>4}"
        print(f"{name:<12} {lines:>16} {branches:>16}")


if __name__ == "__main__":
    main(sys.argv[1])
