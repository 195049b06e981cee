"""cargo_fuzzing's parsing: libFuzzer status lines, crash reports and their dedupe signatures,
project discovery and the build errors a user sees. The reports are real ones (a Rust panic
and an AddressSanitizer heap overflow, recorded from this tool's builds, paths shortened)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forgespace.workflows._tools import cargo_fuzz
from forgespace.workflows._tools.cargo_fuzz import (
    _build_error,
    analyse_report,
    find_project,
    parse_status,
    run_cargo_fuzz,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cargo_fuzz"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rust_fuzz_target"


def report(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "#2\tINITED cov: 27 ft: 27 corp: 1/1b exec/s: 0 rss: 31Mb",
            {"executions": 2, "coverage": 27, "corpus_size": 1, "exec_per_sec": 0},
        ),
        (
            "#1087\tNEW    cov: 35 ft: 35 corp: 4/22b lim: 14 exec/s: 0 rss: 32Mb L: 7/8 "
            'MS: 4 CrossOver-ShuffleBytes-EraseBytes-CMP- DE: "FUZZ"-',
            {"executions": 1087, "coverage": 35, "corpus_size": 4, "exec_per_sec": 0},
        ),
        (
            "#524288\tpulse  cov: 37 ft: 41 corp: 5/31b lim: 4096 exec/s: 174762 rss: 48Mb",
            {"executions": 524288, "coverage": 37, "corpus_size": 5, "exec_per_sec": 174762},
        ),
        (
            "#3301\tREDUCE cov: 36 ft: 36 corp: 5/30b lim: 33 exec/s: 3301 rss: 33Mb L: 6/9 MS: 1",
            {"executions": 3301, "coverage": 36, "corpus_size": 5, "exec_per_sec": 3301},
        ),
        ("#1\tINIT   ", {"executions": 1}),
    ],
)
def test_status_lines_give_the_live_figures(line: str, expected: dict[str, int]) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "INFO: Seed: 1234",
        "Done 1000 runs in 1 second(s)",
        "    #3 0x557f7057e796 in {closure#0} lib.rs:71:9",
        'MS: 1 PersAutoDict- DE: "FUZZ"-; base unit: 3d2508767a22ae0f915eff2c6bbee2a65dd99354',
    ],
)
def test_other_lines_are_not_status_lines(line: str) -> None:
    assert parse_status(line) is None


def test_a_panic_report_is_located_and_signed_by_the_targets_own_frames() -> None:
    info = analyse_report(report("panic_slice_index.txt"), "crash")
    assert info["kind"] == "panic"
    assert info["message"] == "range end index 57 out of range for slice of length 9"
    assert info["location"] == "/ws/src/lib.rs:19"
    # std's inlined frames (short names, /rustc/ sources), libfuzzer-sys and libFuzzer's
    # own frames are left out; the target's parser and its fuzz closure remain.
    assert [f["function"] for f in info["stack"]] == [
        "parse",
        "parse_header::_::__libfuzzer_sys_run",
    ]
    assert info["stack"][0]["file"] == "/ws/src/lib.rs" and info["stack"][0]["line"] == 19
    assert info["signature"] == "panic | parse | parse_header::_::__libfuzzer_sys_run"


def test_the_same_bug_with_other_inputs_has_one_signature_and_other_bugs_another() -> None:
    lines = report("panic_slice_index.txt")
    same = [
        ln.replace(
            "range end index 57 out of range for slice of length 9",
            "range end index 9 out of range for slice of length 6",
        ).replace("(2)", "(7)")
        for ln in lines
    ]
    assert analyse_report(same, "crash")["signature"] == analyse_report(lines, "crash")["signature"]
    other = [ln.replace("   5: parse", "   5: parse_payload") for ln in lines]
    assert (
        analyse_report(other, "crash")["signature"] != analyse_report(lines, "crash")["signature"]
    )


def test_an_asan_report_is_signed_by_the_faulting_frames() -> None:
    info = analyse_report(report("asan_heap_overflow.txt"), "crash")
    assert info["kind"] == "heap-buffer-overflow"
    assert info["message"].startswith("AddressSanitizer: heap-buffer-overflow on address")
    assert info["stack"][0] == {
        "function": "parse_header::read_past",
        "file": "/ws/fuzz/fuzz_targets/parse_header.rs",
        "line": 7,
    }
    assert info["location"] == "/ws/fuzz/fuzz_targets/parse_header.rs:7"
    # libfuzzer-sys, std (/rustc/), libFuzzer (fuzzer::), main and libc frames are dropped.
    assert [f["function"] for f in info["stack"]] == [
        "parse_header::read_past",
        "parse_header::_::__libfuzzer_sys_run",
    ]
    assert info["signature"] == (
        "heap-buffer-overflow | parse_header::read_past | parse_header::_::__libfuzzer_sys_run"
    )


def test_a_report_without_frames_falls_back_to_its_kind() -> None:
    lines = ["==12== ERROR: libFuzzer: timeout after 25 seconds", "SUMMARY: libFuzzer: timeout"]
    info = analyse_report(lines, "timeout")
    assert info["kind"] == "timeout after 25 seconds"
    assert info["signature"] == "timeout after 25 seconds"


def test_the_example_project_is_found_with_its_fuzz_target(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(EXAMPLE, ws)
    project = find_project(ws)
    assert project.fuzz_dir == ws / "fuzz"
    assert project.targets == {"parse_header": "fuzz_targets/parse_header.rs"}


def test_a_target_without_a_fuzz_project_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "Cargo.toml").write_text('[package]\nname = "x"\nversion = "0.1.0"\n')
    with pytest.raises(ValueError, match=r"no cargo-fuzz project .*fuzz/Cargo.toml"):
        find_project(tmp_path)
    single = tmp_path / "target"
    single.write_text("fn main() {}")
    with pytest.raises(ValueError, match="not the single file"):
        find_project(single)


def test_an_unknown_target_name_lists_the_available_ones(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(EXAMPLE, ws)
    with pytest.raises(ValueError, match=r"target_name 'nope' .* available: parse_header"):
        run_cargo_fuzz(ws, target_name="nope")


def test_a_missing_crate_in_an_offline_build_says_to_vendor_it() -> None:
    output = [
        "error: no matching package named `itoa` found",
        "location searched: crates.io index",
        "required by package `packet_header-fuzz v0.0.0 (/ws/fuzz)`",
        "note: offline mode (via `--offline`) can sometimes cause surprising resolution failures",
    ]
    err = str(_build_error(output, "parse_header", 101, ""))
    assert "(itoa)" in err and "cargo vendor" in err and "no matching package" in err
    compile_error = ["   Compiling x v0.1.0", "error[E0308]: mismatched types", " --> a.rs:1:1"]
    err = str(_build_error(compile_error, "parse_header", 101, ""))
    assert "cargo vendor" not in err
    assert "error[E0308]: mismatched types" in err and "Compiling" not in err


def test_missing_libfuzzer_names_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CUSTOM_LIBFUZZER_PATH", raising=False)
    with pytest.raises(cargo_fuzz.ToolError, match="apt-get install libfuzzer-14-dev"):
        cargo_fuzz.find_libfuzzer(llvm_root=tmp_path)
    archive = tmp_path / "llvm-19" / "lib" / "libFuzzer.a"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"!<arch>\n")
    (tmp_path / "llvm-9" / "lib").mkdir(parents=True)
    (tmp_path / "llvm-9" / "lib" / "libFuzzer.a").write_bytes(b"!<arch>\n")
    assert cargo_fuzz.find_libfuzzer(llvm_root=tmp_path) == archive  # the newest
    monkeypatch.setenv("CUSTOM_LIBFUZZER_PATH", str(tmp_path / "nope.a"))
    with pytest.raises(cargo_fuzz.ToolError, match="CUSTOM_LIBFUZZER_PATH"):
        cargo_fuzz.find_libfuzzer(llvm_root=tmp_path)
