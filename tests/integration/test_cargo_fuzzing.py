"""cargo_fuzzing end to end through the real Temporal dev server: the example's planted bug is
built offline, fuzzed in the sandbox and reported; a target that does not compile, one with
an unvendored dependency, and a cancelled run.

Skipped (with the reason) only where the host has no Rust toolchain or no libFuzzer
(`.ci/run` installs libfuzzer-14-dev; rustup provides Rust).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from test_workflows_bundled import bundled_worker, cluster_settings, run_bundled_job

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.api import WorkflowRequest
from forgespace.temporal.runner import RunJob
from forgespace.workflows._tools import cargo_fuzz
from forgespace.workflows._tools.common import ToolError

__all__ = ["cluster_settings"]  # the fixture, imported for this module's tests

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rust_fuzz_target"
LIVE_KEYS = {"phase", "executions", "exec_per_sec", "coverage", "corpus_size", "crashes"}


def _missing_tools() -> str | None:
    if not cargo_fuzz.find_toolchains():
        return "no Rust toolchain (rustup or cargo on PATH)"
    try:
        cargo_fuzz.find_libfuzzer()
    except ToolError as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(_missing_tools() is not None, reason=str(_missing_tools())),
]


def copy_example(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(EXAMPLE, dest)
    return dest


def test_the_planted_bug_is_found_with_an_input_that_triggers_it(
    cluster_settings: Settings, task_queue: str
) -> None:
    job = RunJob(
        workflow="cargo_fuzzing",
        path=EXAMPLE,
        runs=1,
        params={"timeout_seconds": 120, "max_crashes": 1},
        task_queue=task_queue,
    )
    report = run_bundled_job(cluster_settings, task_queue, job)
    assert report["workspace_isolation"] == "isolated"
    [run] = report["runs"]
    assert run["status"] == "completed", run["error"]
    assert run["findings"] == 1
    result = run["result"]
    assert result["stopped"] == "max_crashes"
    assert result["target_name"] == "parse_header"  # the only fuzz target, found by itself
    assert result["executions"] > 0 and result["coverage"] > 0
    [finding] = result["findings"]
    assert finding["kind"] == "panic"
    assert finding["location"] == "src/lib.rs:19"  # the planted slice, relative to the target
    assert finding["stack"][0]["file"] == "src/lib.rs"
    assert "out of range for slice" in finding["message"]
    # The input really is the bug: magic, then a length byte pointing past the end.
    data = base64.b64decode(finding["input_base64"])
    assert data[:4] == b"FUZZ" and len(data) < 6 + data[5]
    # Crash file and corpus were in the run's own workspace, removed at cleanup.
    assert finding["crash_file"].startswith("fuzz/artifacts/parse_header/crash-")
    assert finding["reproduce"] == f"cargo fuzz run parse_header {finding['crash_file']}"
    assert not Path(run["workspace"]).exists()
    # SARIF like the other workflows, stored through upload_results.
    [sarif_run] = result["sarif"]["runs"]
    [sarif_result] = sarif_run["results"]
    location = sarif_result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "src/lib.rs"
    assert location["region"]["startLine"] == 19
    stored = json.loads(Path(result["results_location"]["sarif"]).read_text())
    assert stored["runs"][0]["results"][0]["ruleId"] == sarif_result["ruleId"]
    assert not WorkspaceCache(cluster_settings).index.live_leases()


def test_a_target_that_does_not_compile_fails_with_the_compilers_error(
    cluster_settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    broken = copy_example(tmp_path, "broken")
    src = broken / "fuzz" / "fuzz_targets" / "parse_header.rs"
    src.write_text(
        src.read_text().replace("let _ = packet_header::parse(data);", 'let n: u32 = "x";')
    )
    job = RunJob(
        workflow="cargo_fuzzing", path=broken, params={"timeout_seconds": 10}, task_queue=task_queue
    )
    [run] = run_bundled_job(cluster_settings, task_queue, job)["runs"]
    assert run["status"] == "failed"
    assert "cargo build of the fuzz target 'parse_header' failed" in run["error"]
    assert "error[E0308]: mismatched types" in run["error"]
    assert "fuzz_targets/parse_header.rs" in run["error"]


def test_an_unvendored_dependency_fails_saying_to_vendor_it(
    cluster_settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    target = copy_example(tmp_path, "needs_crate")
    with (target / "fuzz" / "Cargo.toml").open("a") as f:
        f.write('\n[dependencies.itoa]\nversion = "1"\n')
    job = RunJob(
        workflow="cargo_fuzzing", path=target, params={"timeout_seconds": 10}, task_queue=task_queue
    )
    [run] = run_bundled_job(cluster_settings, task_queue, job)["runs"]
    assert run["status"] == "failed"
    assert "(itoa)" in run["error"]
    assert "cargo vendor" in run["error"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def test_cancelling_a_run_kills_the_fuzzer(
    cluster_settings: Settings, task_queue: str, tmp_path: Path
) -> None:
    # A slow target without a crash: it would fuzz for its whole 300 s budget.
    calm = copy_example(tmp_path, "calm")
    src = calm / "fuzz" / "fuzz_targets" / "parse_header.rs"
    slow = "std::thread::sleep(std::time::Duration::from_millis(2)); data.len()"
    src.write_text(src.read_text().replace("packet_header::parse(data)", slow))
    tid = open_store(cluster_settings).upload_target(calm)
    req = WorkflowRequest(
        tid,
        f"cancel-{uuid.uuid4().hex[:6]}",
        "isolated",
        {"timeout_seconds": 300, "max_iterations": 2_000_000_000},
    )
    cache_dir = str(cluster_settings.cache_dir)

    async def main() -> tuple[list[dict[str, Any]], list[str], BaseException | None]:
        assert cluster_settings.temporal_address
        client = await Client.connect(
            cluster_settings.temporal_address, namespace=cluster_settings.temporal_namespace
        )
        seen: list[dict[str, Any]] = []
        async with bundled_worker(cluster_settings, client, task_queue):
            h = await client.start_workflow(
                "cargo_fuzzing", req, id=f"cargo-{req.run_id}", task_queue=task_queue
            )
            result = asyncio.create_task(h.result())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not result.done():
                desc = await h.describe()
                for pa in desc.raw_description.pending_activities:
                    if pa.activity_type.name == "cargo_fuzz" and pa.heartbeat_details.payloads:
                        values = await client.data_converter.decode(pa.heartbeat_details.payloads)
                        seen.append(values[-1])
                if seen and seen[-1]["phase"] == "fuzz" and seen[-1]["executions"] > 0:
                    break
                await asyncio.sleep(0.5)
            running = _processes_mentioning(cache_dir)
            await h.cancel()
            try:
                await asyncio.wait_for(result, timeout=60)
            except WorkflowFailureError as exc:
                return seen, running, exc.cause
            return seen, running, None

    started = time.monotonic()
    seen, running, cause = asyncio.run(main())
    assert seen and seen[-1]["phase"] == "fuzz", seen[-3:]
    assert all(set(d) == LIVE_KEYS for d in seen)
    assert running, "the fuzzer was not seen running before the cancel"
    assert type(cause).__name__ == "CancelledError", cause
    assert time.monotonic() - started < 200  # the 300 s budget was cut short
    assert _processes_mentioning(cache_dir) == []  # bwrap, the fuzzer: all gone
    assert not WorkspaceCache(cluster_settings).index.live_leases()
