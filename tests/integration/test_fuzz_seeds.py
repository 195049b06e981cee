"""The fuzz harnesses run over their committed seed corpora once (libFuzzer ``-runs=0``: every
seed executed, no mutation) and exit cleanly: every seed ends in a documented refusal or a
workspace that keeps the harness's invariants (fuzz/_invariants.py). A seed that crashes the
code under test, or a harness broken by a change to the modules it drives, fails here before
the timed `make fuzz` of CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="the fuzz harnesses need atheris (the test extras)")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", ["manifest", "archive"])
def test_harness_runs_its_seed_corpus_cleanly(target: str, tmp_path: Path) -> None:
    seeds = ROOT / "fuzz" / "corpus" / target
    count = len(list(seeds.iterdir()))
    assert count >= 40
    (tmp_path / "scratch").mkdir()
    (tmp_path / "new").mkdir()
    env = {**os.environ, "FORGESPACE_FUZZ_DIR": str(tmp_path / "scratch")}
    proc = subprocess.run(
        [sys.executable, f"fuzz/fuzz_{target}.py", str(tmp_path / "new"), str(seeds),
         "-runs=0", f"-artifact_prefix={tmp_path}/"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp_path.glob("crash-*"))
    # libFuzzer counts the seeds it executed (one more: the empty input it always tries).
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done is not None, proc.stderr[-2000:]
    assert int(done.group(1)) >= count
