"""atheris fuzzing tool: the planted crash is found, reproduces, is deduplicated by stack."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from forgespace.workflows._tools.common import ToolError
from forgespace.workflows._tools.fuzzing import discover_target, run_atheris

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fuzz_target"


@pytest.fixture
def fuzz_workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    shutil.copytree(EXAMPLE, ws)
    return ws


def reproduce(workspace: Path, target: str, data: bytes) -> str:
    """Feed ``data`` to the target's TestOneInput in a fresh interpreter; return what it raised."""
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {str(workspace)!r})\n"
        f"m = importlib.import_module({Path(target).stem!r})\n"
        "try:\n"
        f"    m.TestOneInput({data!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
        "else:\n"
        "    print('no exception')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.strip()


def test_planted_crash_is_found_and_its_input_reproduces_it(fuzz_workspace: Path) -> None:
    beats: list[dict[str, Any]] = []
    result = run_atheris(
        fuzz_workspace,
        max_iterations=5_000_000,
        timeout_seconds=30,
        max_crashes=1,
        heartbeat=beats.append,
    )
    assert result["stopped"] == "max_crashes"
    assert result["target_file"] == "fuzz_header.py"  # auto-discovered
    assert result["unique_crashes"] == 1, result["findings"]
    finding = result["findings"][0]
    assert finding["exception_type"] == "builtins.IndexError"
    lines = (fuzz_workspace / "header_parser.py").read_text().splitlines()
    bug_line = next(n for n, ln in enumerate(lines, 1) if "checksum = data[" in ln)
    assert finding["location"] == f"header_parser.py:{bug_line}"
    assert [f["function"] for f in finding["stack"]] == ["TestOneInput", "parse_header"]
    data = base64.b64decode(finding["input_base64"])
    assert data.startswith(b"FSPC\x07")
    assert reproduce(fuzz_workspace, "fuzz_header.py", data) == "IndexError"
    # Corpus and crash files live inside the run's workspace.
    crash_file = fuzz_workspace / finding["crash_file"]
    assert crash_file.read_bytes() == data
    assert (fuzz_workspace / result["corpus_dir"]).is_dir()
    assert result["corpus_size"] >= 1
    assert any((fuzz_workspace / result["corpus_dir"]).iterdir())
    # Live stats went through the heartbeat callback with the agreed keys.
    assert beats, "no heartbeat"
    assert set(beats[-1]) == {"executions", "exec_per_sec", "corpus_size", "crashes"}
    assert beats[-1]["crashes"] == 1
    assert beats[-1]["executions"] == result["executions"] > 0


def test_fuzzing_goes_on_after_a_crash_and_dedups_by_stack(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_two_bugs.py").write_text(
        "def TestOneInput(data):\n"
        "    if data[:1] == b'A':\n"
        "        raise ValueError('bug one')\n"
        "    if data[:1] == b'B':\n"
        "        {}['bug two']\n"
    )
    result = run_atheris(ws, max_iterations=20_000, timeout_seconds=30)
    types = sorted(f["exception_type"] for f in result["findings"])
    assert types == ["builtins.KeyError", "builtins.ValueError"]
    # Both bugs are hit many times, but each distinct stack is reported once.
    assert result["crashes_total"] > 2
    # Whichever limit came first (a loaded machine may reach the time budget), the budget holds.
    assert result["stopped"] in ("max_iterations", "timeout")
    if result["stopped"] == "max_iterations":
        assert result["executions"] == 20_000
    else:
        assert 0 < result["executions"] < 20_000
    for f in result["findings"]:
        first = base64.b64decode(f["input_base64"])[:1]
        assert first == (b"A" if f["exception_type"] == "builtins.ValueError" else b"B")


def test_timeout_stops_a_run(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_slow.py").write_text(
        "import time\n\ndef TestOneInput(data):\n    time.sleep(0.01)\n"
    )
    started = time.monotonic()
    result = run_atheris(ws, max_iterations=10_000_000, timeout_seconds=2)
    elapsed = time.monotonic() - started
    assert result["stopped"] == "timeout"
    assert result["findings"] == []
    assert 1.5 < elapsed < 15
    assert 0 < result["executions"] < 10_000_000


def test_target_discovery_and_bad_parameters(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "pkg").mkdir(parents=True)
    (ws / "pkg" / "harness.py").write_text("def TestOneInput(data):\n    pass\n")
    (ws / "fuzz_main.py").write_text("def TestOneInput(data):\n    pass\n")
    (ws / "other.py").write_text("x = 1\n")
    assert discover_target(ws) == ws / "fuzz_main.py"
    with pytest.raises(ValueError, match="outside the workspace"):
        run_atheris(ws, target_file="../elsewhere.py")
    with pytest.raises(ValueError, match="not a file"):
        run_atheris(ws, target_file="missing.py")
    with pytest.raises(ValueError, match="max_iterations"):
        run_atheris(ws, max_iterations=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "lib.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="TestOneInput"):
        run_atheris(empty)


def test_a_target_that_cannot_be_imported_is_a_tool_error(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_broken.py").write_text(
        "import no_such_module_here\n\ndef TestOneInput(d):\n    pass\n"
    )
    with pytest.raises(ToolError, match="no_such_module_here"):
        run_atheris(ws, max_iterations=10, timeout_seconds=10)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_failing_heartbeat_cancels_and_kills_the_fuzzer(tmp_path: Path) -> None:
    """An activity cancelled through its heartbeat must not leave the fuzzer running."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_slow.py").write_text(
        "import time\n\ndef TestOneInput(data):\n    time.sleep(0.05)\n"
    )
    calls = []

    def heartbeat(details: dict[str, Any]) -> None:
        calls.append(details)
        if len(calls) >= 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        run_atheris(ws, max_iterations=10_000_000, timeout_seconds=60, heartbeat=heartbeat)
    assert _processes_mentioning(str(ws / "fuzz_slow.py")) == []


def test_a_harness_in_a_subfolder_imports_the_target_package(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "src" / "mylib").mkdir(parents=True)
    (ws / "fuzz").mkdir()
    (ws / "src" / "mylib" / "__init__.py").write_text(
        "def check(data):\n    if data[:2] == b'OK':\n        raise RuntimeError('planted')\n"
    )
    (ws / "fuzz" / "fuzz_mylib.py").write_text(
        "import mylib\n\ndef TestOneInput(data):\n    mylib.check(data)\n"
    )
    result = run_atheris(ws, max_iterations=2_000_000, timeout_seconds=30, max_crashes=1)
    assert result["target_file"] == "fuzz/fuzz_mylib.py"
    [finding] = result["findings"]
    assert finding["exception_type"] == "builtins.RuntimeError"
    assert finding["location"] == "src/mylib/__init__.py:3"


def test_a_single_file_target_is_fuzzed_under_its_stored_name(tmp_path: Path) -> None:
    # A single-file target is stored as ".../target", a name Python cannot import.
    (tmp_path / "t").mkdir()
    target = tmp_path / "t" / "target"
    target.write_text("def TestOneInput(data):\n    return len(data)\n")
    result = run_atheris(target, max_iterations=20, timeout_seconds=60)
    assert result["target_file"] == "target"
    assert result["stopped"] == "max_iterations" and result["findings"] == []
    # Its work files go next to the file, never into it.
    assert (result["corpus_dir"], result["crash_dir"]) == (".atheris/corpus", ".atheris/crashes")
    assert (tmp_path / "t" / ".atheris" / "src" / "fuzz_target_module.py").is_file()
    assert target.read_text() == "def TestOneInput(data):\n    return len(data)\n"

    plain = tmp_path / "p" / "target"
    plain.parent.mkdir()
    plain.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"the target file 'target' defines no TestOneInput"):
        run_atheris(plain)


def test_a_native_crash_is_a_finding_with_its_input(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_abort.py").write_text(
        "import os\n\ndef TestOneInput(data):\n    os.abort()  # a crash below Python\n"
    )
    result = run_atheris(ws, max_iterations=100, timeout_seconds=60)
    assert result["stopped"] == "native_crash"
    [finding] = result["findings"]
    assert finding["kind"] == "native_crash" and finding["exception_type"] == "crash"
    assert finding["crash_file"].startswith(".atheris/crashes/native-crash-")
    assert (ws / finding["crash_file"]).read_bytes() == base64.b64decode(finding["input_base64"])
    assert "deadly signal" in finding["exception_message"]


def test_a_chosen_target_file_is_fuzzed_and_large_files_are_not_candidates(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    # Over 2 MB: generated code, not a harness, even though it names TestOneInput.
    (ws / "fuzz_generated.py").write_text(
        "def TestOneInput(data):\n    pass\n" + "#" * 2_000_001 + "\n"
    )
    (ws / "sub" / "harness.py").write_text("def TestOneInput(data):\n    pass\n")
    assert discover_target(ws) == ws / "sub" / "harness.py"
    result = run_atheris(ws, target_file="sub/harness.py", max_iterations=10, timeout_seconds=60)
    assert result["target_file"] == "sub/harness.py" and result["stopped"] == "max_iterations"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"timeout_seconds": True}, "timeout_seconds must be a positive integer, got True"),
        ({"timeout_seconds": "soon"}, "timeout_seconds must be a positive integer, got 'soon'"),
        ({"max_iterations": [5]}, r"max_iterations must be a positive integer, got \[5\]"),
        ({"max_crashes": -1}, "max_crashes must be an integer >= 0, got -1"),
        ({"max_crashes": True}, "max_crashes must be an integer >= 0, got True"),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(
    tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fuzz_x.py").write_text("def TestOneInput(data):\n    pass\n")
    with pytest.raises(ValueError, match=message):
        run_atheris(ws, **params)
    assert not (ws / ".atheris").exists()
