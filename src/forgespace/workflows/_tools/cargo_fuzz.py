# Over 500 lines for now: the cargo_fuzzing tool (offline build, libFuzzer runs and restarts,
# status-line parsing, crash dedupe, SARIF); the log parsing is the next piece to move out.
"""Rust fuzzing of a cargo-fuzz project, built offline and run in the workspace's sandbox.

``run_cargo_fuzz(workspace, ...)`` takes a target laid out as ``cargo fuzz init`` makes it
(``fuzz/Cargo.toml`` with one ``[[bin]]`` per ``fuzz/fuzz_targets/*.rs`` using
``libfuzzer_sys::fuzz_target!``), then:

1. builds the chosen fuzz target with ``cargo build --offline --release`` and the flags
   cargo-fuzz uses (SanitizerCoverage: inline 8-bit counters, PC table, compare tracing;
   ``--cfg fuzzing``, debug assertions, overflow checks), plus ``-Zsanitizer=address`` when
   AddressSanitizer is asked for and a nightly toolchain is installed. The crates registry is
   not reachable, so crates.io's ``libfuzzer-sys`` is replaced (``[patch.crates-io]`` given
   with ``--config``; the target is not edited) by the small compatible crate shipped in
   ``cargo_fuzzing/crates/libfuzzer-sys``, linked against the host's libFuzzer (Debian's
   ``libfuzzer-N-dev``). Other dependencies must be vendored (``cargo vendor``);
2. runs libFuzzer on ``fuzz/corpus/<target>`` (seeds shipped there are used), writing crash
   inputs to ``fuzz/artifacts/<target>/``, heartbeating live figures parsed from libFuzzer's
   status lines. After a crash libFuzzer is started again on the grown corpus until the time
   or iteration budget is spent, ``max_crashes`` distinct crashes are found, or the same crash
   came back ``REPEAT_LIMIT`` times in a row (it hides the rest of the input space);
3. returns one finding per distinct crash: deduplicated by the kind of crash and the top
   frames of the symbolised report that belong to the target (Rust's panic backtrace, else
   the AddressSanitizer report), with the input, the report and the command reproducing it.

cargo and rustc come from the host's rustup toolchains (``$RUSTUP_HOME/toolchains``, default
``~/.rustup``) or a ``cargo`` on PATH; the toolchain's directory is bound read-only into the
sandbox, nothing else of the home directory. ``CARGO_HOME`` and ``CARGO_TARGET_DIR`` live in
the run's own copy of the target.
"""

from __future__ import annotations

import base64
import collections
import os
import platform
import re
import shutil
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgespace import sandbox
from forgespace.workflows._tools import sarif
from forgespace.workflows._tools.common import (
    Heartbeat,
    Throttle,
    ToolError,
    pump_lines,
    sandbox_note,
    workspace_root,
)

#: The compatible libfuzzer-sys shipped with the package.
SHIPPED_CRATE = (
    Path(__file__).resolve().parent.parent / "cargo_fuzzing" / "crates" / "libfuzzer-sys"
)
#: Where Debian's librust-*-dev packages put crate sources.
DEBIAN_CRATES = Path("/usr/share/cargo/registry")
#: The instrumentation cargo-fuzz applies (``cargo fuzz build``'s defaults).
COVERAGE_FLAGS = (
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
)
BUILD_TIMEOUT_SECONDS = 600
# How long past timeout_seconds one libFuzzer process may take before it is killed.
GRACE_SECONDS = 15.0
#: Stop restarting once the same crash was found this many times in a row.
REPEAT_LIMIT = 3
LOG_TAIL_LINES = 80
REPORT_MAX_LINES = 400
SIGNATURE_FRAMES = 3
LIVE_KEYS = ("phase", "executions", "exec_per_sec", "coverage", "corpus_size", "crashes")

# libFuzzer status: "#1087\tNEW    cov: 35 ft: 35 corp: 4/22b lim: 14 exec/s: 0 rss: 32Mb ..."
_STATUS = re.compile(
    r"^#(?P<execs>\d+)\s+(?P<event>[A-Za-z]+)\s+(?:cov: (?P<cov>\d+)\s+)?"
    r"(?:ft: (?P<ft>\d+)\s+)?(?:corp: (?P<corp>\d+)/\S+\s+)?"
    r"(?:.*?exec/s: (?P<eps>\d+))?"
)
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_FINAL_EXECS = re.compile(r"^stat::number_of_executed_units:\s*(\d+)")
_PANIC = re.compile(
    r"^thread '.*?' (?:\(\d+\) )?panicked at (?P<loc>.+?):(?P<line>\d+):(?P<col>\d+):?$"
)
_RUST_FRAME = re.compile(r"^\s*(\d+):\s+(?:0x[0-9a-f]+ - )?(?P<fn>.+?)\s*$")
_RUST_AT = re.compile(r"^\s+at (?P<file>.+?):(?P<line>\d+)(?::\d+)?\s*$")
_SAN_FRAME = re.compile(r"^\s*#(\d+) 0x[0-9a-f]+(?: in (?P<rest>.+))?$")
_SAN_ERROR = re.compile(
    r"ERROR: (?:AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer): (\S+)"
)
_LIBFUZZER_ERROR = re.compile(r"ERROR: libFuzzer: (.+?)\s*$")
_HASH_SUFFIX = re.compile(r"::h[0-9a-f]{16}$")
_NO_MATCH = re.compile(r"no matching package named `([^`]+)` found")
_OFFLINE_HINT = re.compile(
    r"--offline|offline mode|failed to (?:download|load source for dependency)|"
    r"registry `crates-io`|failed to get `",
)

# Frames of the runtimes around the target: never part of a crash's identity.
_RUNTIME_PREFIXES = (
    "std::",
    "core::",
    "alloc::",
    "<std::",
    "<core::",
    "<alloc::",
    "__rustc::",
    "__rust",
    "rust_begin_unwind",
    "rust_panic",
    "rust_fuzzer_test_input",
    "libfuzzer_sys::",
    "<libfuzzer_sys::",
    "fuzzer::",
    "_ZN6fuzzer",
    "LLVMFuzzer",
    "__sanitizer",
    "__asan",
    "__lsan",
    "__ubsan",
    "__interceptor",
    "__libc",
    "__GI_",
    "__pthread",
    "_start",
    "abort",
    "raise",
    "panic_abort",
    "backtrace::",
)
_RUNTIME_NAMES = frozenset({"main"})
# Source files of the runtimes (inlined frames carry short names, so their file tells).
_RUNTIME_FILES = re.compile(r"^/rustc/|/libfuzzer-sys/src/|^\./csu/|/sysdeps/|/compiler-rt/")


@dataclass(frozen=True)
class Toolchain:
    """A Rust toolchain: its directory (bound read-only into the sandbox), cargo and rustc."""

    name: str
    root: Path
    cargo: Path
    rustc: Path

    @property
    def nightly(self) -> bool:
        return self.name.startswith("nightly")


# --- finding the tools ------------------------------------------------------------------------


def rustup_home() -> Path:
    """``$RUSTUP_HOME``, else ``~/.rustup``."""
    return Path(os.environ.get("RUSTUP_HOME") or Path.home() / ".rustup")


def find_toolchains() -> list[Toolchain]:
    """rustup's installed toolchains, then a plain ``cargo`` on PATH (e.g. Debian's).

    rustup's proxies (``~/.cargo/bin``) are not used: the toolchains' own binaries are, so
    nothing of rustup's state is needed inside the sandbox.
    """
    found: list[Toolchain] = []
    base = rustup_home() / "toolchains"
    if base.is_dir():
        for d in sorted(base.iterdir()):
            cargo, rustc = d / "bin" / "cargo", d / "bin" / "rustc"
            if cargo.is_file() and rustc.is_file():
                found.append(Toolchain(d.name, d.resolve(), cargo, rustc))
    cargo_on_path = shutil.which("cargo")
    if cargo_on_path:
        real = Path(os.path.realpath(cargo_on_path))
        rustc = real.parent / "rustc"
        if real.name == "cargo" and rustc.is_file() and real.parent.name == "bin":
            prefix = real.parent.parent
            if not any(t.root == prefix for t in found) and "rustup" not in real.parts:
                found.append(Toolchain(f"system ({prefix})", prefix, real, rustc))
    return found


def choose_toolchain(toolchains: Sequence[Toolchain], *, want_nightly: bool) -> Toolchain:
    """Nightly when asked for (and there is one), else stable, else whatever there is."""
    if not toolchains:
        raise ToolError(
            "no Rust toolchain found: cargo_fuzzing needs cargo and rustc, from rustup "
            f"({rustup_home() / 'toolchains'}) or a cargo on PATH (Debian: apt-get install "
            "cargo); install one on the worker's host"
        )

    def rank(t: Toolchain) -> tuple[int, str]:
        if want_nightly and t.nightly:
            return (0, t.name)
        if t.name.startswith("stable"):
            return (1, t.name)
        return (2 if not t.nightly else 3, t.name)

    return min(toolchains, key=rank)


def find_libfuzzer(*, llvm_root: Path = Path("/usr/lib")) -> Path:
    """``CUSTOM_LIBFUZZER_PATH`` (crates.io libfuzzer-sys' variable), else the newest
    ``{llvm_root}/llvm-N/lib/libFuzzer.a``; a ToolError saying what to install otherwise."""
    custom = os.environ.get("CUSTOM_LIBFUZZER_PATH")
    if custom:
        path = Path(custom)
        if not path.is_file():
            raise ToolError(f"CUSTOM_LIBFUZZER_PATH={custom!r} is not a file (libFuzzer.a)")
        return path.resolve()
    candidates = []
    for p in llvm_root.glob("llvm-*/lib/libFuzzer.a"):
        version = p.parent.parent.name.removeprefix("llvm-")
        if version.isdigit():
            candidates.append((int(version), p))
    if not candidates:
        raise ToolError(
            "libFuzzer is not installed on the worker's host: install Debian's "
            "libfuzzer-14-dev (apt-get install libfuzzer-14-dev; any libfuzzer-N-dev works) "
            "or set CUSTOM_LIBFUZZER_PATH to a libFuzzer.a"
        )
    return max(candidates)[1]


def find_debian_arbitrary() -> Path | None:
    """Debian's ``arbitrary`` 1.x sources (librust-arbitrary-dev), when installed."""
    found = sorted(DEBIAN_CRATES.glob("arbitrary-1.*"))
    return found[-1] if found and (found[-1] / "Cargo.toml").is_file() else None


def host_triple() -> str:
    """The target triple of this host (builds pass ``--target`` so that build scripts and
    proc-macros are not instrumented, as cargo-fuzz does)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    return f"{machine}-unknown-linux-gnu"


# --- the project ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzProject:
    """A cargo-fuzz project: its directory and its fuzz targets (bin name -> source)."""

    root: Path
    fuzz_dir: Path
    targets: dict[str, str]


def find_project(root: Path) -> FuzzProject:
    """The cargo-fuzz project of a workspace: ``fuzz/Cargo.toml``, or a root ``Cargo.toml``
    marked ``[package.metadata] cargo-fuzz = true``."""
    if root.is_file():
        raise ValueError(
            "cargo_fuzzing needs a directory holding a cargo-fuzz project (fuzz/Cargo.toml), "
            f"not the single file {root.name!r}"
        )
    for fuzz_dir in (root / "fuzz", root):
        manifest = fuzz_dir / "Cargo.toml"
        if not manifest.is_file():
            continue
        try:
            data = tomllib.loads(manifest.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{manifest.relative_to(root)} is not valid TOML: {exc}") from exc
        if fuzz_dir == root and not data.get("package", {}).get("metadata", {}).get("cargo-fuzz"):
            continue
        targets: dict[str, str] = {}
        for b in data.get("bin", []) or []:
            if isinstance(b, dict) and isinstance(b.get("name"), str):
                targets[b["name"]] = str(b.get("path") or f"src/bin/{b['name']}.rs")
        if not targets:
            for src in sorted((fuzz_dir / "fuzz_targets").glob("*.rs")):
                targets[src.stem] = f"fuzz_targets/{src.name}"
        if not targets:
            raise ValueError(
                f"{manifest.relative_to(root)} declares no fuzz target ([[bin]] entries, "
                "or fuzz_targets/*.rs)"
            )
        return FuzzProject(root, fuzz_dir, targets)
    raise ValueError(
        "no cargo-fuzz project in the target: expected fuzz/Cargo.toml with "
        "fuzz/fuzz_targets/*.rs (as `cargo fuzz init` creates)"
    )


def _patched_crate(work: Path, arbitrary: Path | None) -> Path:
    """A copy of the shipped libfuzzer-sys in the run's workspace; with Debian's
    ``arbitrary`` added to its manifest when that is installed."""
    dest = work / "libfuzzer-sys"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(SHIPPED_CRATE, dest)
    if arbitrary is not None:
        manifest = dest / "Cargo.toml"
        text = manifest.read_text()
        text = text.replace(
            "[features]\n",
            f"[dependencies.arbitrary]\npath = {str(arbitrary)!r}\noptional = true\n\n[features]\n",
            1,
        ).replace('default = ["link_libfuzzer"]', 'default = ["link_libfuzzer", "arbitrary"]', 1)
        manifest.write_text(text)
    return dest


# --- parsing libFuzzer's output ---------------------------------------------------------------


def parse_status(line: str) -> dict[str, int] | None:
    """Figures of one libFuzzer status line (``#N EVENT cov: .. corp: n/.. exec/s: ..``)."""
    m = _STATUS.match(line)
    if not m:
        return None
    out = {"executions": int(m["execs"])}
    if m["cov"] is not None:
        out["coverage"] = int(m["cov"])
    if m["corp"] is not None:
        out["corpus_size"] = int(m["corp"])
    if m["eps"] is not None:
        out["exec_per_sec"] = int(m["eps"])
    return out


def _frame_name(rest: str) -> tuple[str, str, int | None]:
    """Function, file and line of a sanitizer frame's text after ``in``."""
    text = re.sub(r"\s+\(BuildId: [0-9a-f]+\)$", "", rest.strip())
    text = re.sub(r"\s+\([^()]*\+0x[0-9a-f]+\)$", "", text)
    file, line = "", None
    if m := re.search(r"\s+(\S+?):(\d+)(?::\d+)?$", text):
        file, line = m.group(1), int(m.group(2))
        text = text[: m.start()]
    text = re.sub(r"\s+\S+-cgu\.\d+$", "", text)
    return text.strip(), file, line


def _is_runtime(frame: dict[str, Any]) -> bool:
    function, file = frame["function"], frame["file"] or ""
    if function in _RUNTIME_NAMES or _RUNTIME_FILES.search(file):
        return True
    return function.startswith(_RUNTIME_PREFIXES) or function == ""


def _clean(function: str) -> str:
    return _HASH_SUFFIX.sub("", function)


def rust_frames(report: Sequence[str]) -> list[dict[str, Any]]:
    """Frames of the Rust panic backtrace in ``report`` (``N: function`` / ``at file:line``)."""
    frames: list[dict[str, Any]] = []
    inside = False
    for line in report:
        if line.startswith("stack backtrace:"):
            inside = True
            continue
        if not inside:
            continue
        if m := _RUST_AT.match(line):
            if frames:
                frames[-1]["file"], frames[-1]["line"] = m["file"], int(m["line"])
            continue
        if m := _RUST_FRAME.match(line):
            frames.append({"function": _clean(m["fn"]), "file": "", "line": None})
            continue
        break
    return frames


def sanitizer_frames(report: Sequence[str]) -> list[dict[str, Any]]:
    """Frames of the first stack trace after a sanitizer's (or libFuzzer's) ERROR line."""
    frames: list[dict[str, Any]] = []
    started = False
    for line in report:
        if not started:
            started = "ERROR: " in line and ("Sanitizer" in line or "libFuzzer" in line)
            continue
        m = _SAN_FRAME.match(line)
        if m:
            function, file, num = _frame_name(m["rest"] or "")
            frames.append({"function": _clean(function), "file": file, "line": num})
        elif frames:
            break
    return frames


def analyse_report(report: Sequence[str], artifact_kind: str) -> dict[str, Any]:
    """What a crash report says: kind, message, location, stack, and its dedupe signature.

    The signature is the kind plus the top ``SIGNATURE_FRAMES`` frames that belong to the
    target (runtime frames of std, libFuzzer, the sanitizers and libc left out), from Rust's
    panic backtrace when there is one, else from the sanitizer's report.
    """
    kind, message, location = artifact_kind, "", ""
    panic_at = next((i for i, ln in enumerate(report) if _PANIC.match(ln)), None)
    frames: list[dict[str, Any]] = []
    if panic_at is not None:
        m = _PANIC.match(report[panic_at])
        assert m is not None
        kind = "panic"
        location = f"{m['loc']}:{m['line']}"
        if panic_at + 1 < len(report) and not report[panic_at + 1].startswith("stack backtrace"):
            message = report[panic_at + 1].strip()
        frames = rust_frames(report[panic_at:])
    for line in report:
        if m := _SAN_ERROR.search(line):
            if panic_at is None:
                kind = m.group(1)
                message = line.split("ERROR: ", 1)[1].strip()
            break
    else:
        if panic_at is None:
            for line in report:
                if m := _LIBFUZZER_ERROR.search(line):
                    kind = m.group(1)
                    message = line.split("ERROR: ", 1)[1].strip()
                    break
    if not frames:
        frames = sanitizer_frames(report)
    own = [f for f in frames if not _is_runtime(f)]
    if not location and own and own[0]["file"]:
        location = f"{own[0]['file']}:{own[0]['line']}"
    top = [f["function"] for f in own[:SIGNATURE_FRAMES]]
    if not top and location:
        top = [location]
    return {
        "kind": kind,
        "message": message or kind,
        "location": location,
        "stack": own,
        "signature": " | ".join([kind, *top]),
    }


class FuzzerOutput:
    """Reads one libFuzzer process's output lines (``feed``): keeps ``stats`` (shared with the
    heartbeat) current, and collects the crash report (the lines after the last status line)
    and the artifacts it wrote."""

    def __init__(self, stats: dict[str, Any], base: int, tail: collections.deque[str]) -> None:
        self.stats = stats
        self.base = base  # executions of the processes before this one
        self.tail = tail
        self.executions = 0
        self.report: list[str] = []
        self.artifacts: list[str] = []

    def feed(self, line: str) -> None:
        self.tail.append(line)
        if (figures := parse_status(line)) is not None:
            self._executed(figures["executions"])
            for key in ("coverage", "corpus_size"):
                if key in figures:
                    self.stats[key] = figures[key]
            self.report.clear()
            return
        if m := _DONE.match(line) or _FINAL_EXECS.match(line):
            self._executed(int(m.group(1)))
        if m := _ARTIFACT.search(line):
            self.artifacts.append(m.group(1))
        if len(self.report) < REPORT_MAX_LINES:
            self.report.append(line)

    def _executed(self, n: int) -> None:
        self.executions = max(self.executions, n)
        self.stats["executions"] = self.base + self.executions


# --- running ----------------------------------------------------------------------------------


def _rel(root: Path, path: str | Path, *, cwd: Path | None = None) -> str:
    """``path`` relative to the workspace root; a relative ``path`` is taken from ``cwd``."""
    p = Path(path)
    if not p.is_absolute():
        p = (cwd or root) / p
    try:
        return Path(os.path.normpath(p)).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _error_lines(lines: Iterable[str]) -> list[str]:
    """cargo's output without its progress lines (Compiling, Blocking...)."""
    noise = ("Compiling ", "Blocking ", "Locking ", "Adding ", "Updating ", "Finished ")
    return [ln for ln in lines if not ln.strip().startswith(noise)]


def _build_error(output: list[str], target: str, code: int | None, note: str) -> ToolError:
    text = "\n".join(output)
    missing = sorted(set(_NO_MATCH.findall(text)))
    tail = "\n".join(_error_lines(output)[-LOG_TAIL_LINES:])
    if missing or _OFFLINE_HINT.search(text):
        names = f" ({', '.join(missing)})" if missing else ""
        return ToolError(
            f"the fuzz target {target!r} depends on crates that are not in the target"
            f"{names}: workers build offline (no crates registry), so vendor them: run "
            "`cargo vendor` in fuzz/, add the [source] lines it prints to "
            "fuzz/.cargo/config.toml and upload the target again (libfuzzer-sys is provided; "
            f"do not vendor it). cargo said:\n{tail}"
        )
    return ToolError(
        f"cargo build of the fuzz target {target!r} failed (exit code {code}){note}:\n{tail}"
    )


@dataclass(frozen=True)
class FuzzBuild:
    """What one run builds and fuzzes, decided before cargo starts: the chosen target and
    toolchain, and where the build, corpus and crash inputs live in the run's workspace."""

    root: Path
    project: FuzzProject
    target_name: str
    toolchain: Toolchain
    asan: bool
    notes: list[str]
    libfuzzer: Path
    crate: Path
    cargo_home: Path
    target_dir: Path
    corpus: Path
    artifacts: Path
    binary: Path
    triple: str
    extra_ro: list[Path]

    @property
    def fuzz_dir(self) -> Path:
        return self.project.fuzz_dir


@dataclass(frozen=True)
class FuzzBudget:
    """The limits of the fuzzing phase (run_cargo_fuzz's keyword arguments)."""

    max_iterations: int
    timeout_seconds: int
    max_len: int | None
    max_crashes: int


def run_cargo_fuzz(
    workspace: str | os.PathLike[str],
    *,
    target_name: str | None = None,
    max_iterations: int = 1_000_000,
    timeout_seconds: int = 60,
    max_len: int | None = None,
    max_crashes: int = 0,
    sanitizer: str = "address",
    heartbeat: Heartbeat | None = None,
) -> dict[str, Any]:
    """Build and fuzz one fuzz target of the workspace's cargo-fuzz project (module doc).

    ``timeout_seconds`` bounds the fuzzing (the build has its own ``BUILD_TIMEOUT_SECONDS``);
    heartbeat details are ``{"phase", "executions", "exec_per_sec", "coverage",
    "corpus_size", "crashes"}``.
    """
    build = prepare_build(workspace_root(workspace), target_name, sanitizer=sanitizer)
    box = sandbox.current()
    stats: dict[str, Any] = dict.fromkeys(LIVE_KEYS, 0)
    stats["phase"] = "build"
    throttle = Throttle(heartbeat)
    build_seconds = _build_target(build, box, stats, throttle)

    stats["phase"] = "fuzz"
    budget = FuzzBudget(max_iterations, timeout_seconds, max_len, max_crashes)
    campaign = FuzzCampaign(build, budget, box, stats, throttle)
    campaign.run()
    live = _live(stats, campaign.started)
    throttle(live, force=True)
    return _fuzz_result(build, campaign, live, build_seconds)


def _choose_target(root: Path, project: FuzzProject, target_name: str | None) -> str:
    """The fuzz target asked for (it must exist), else the first by name."""
    if target_name is None:
        return sorted(project.targets)[0]
    if target_name not in project.targets:
        raise ValueError(
            f"target_name {target_name!r} is not a fuzz target of "
            f"{_rel(root, project.fuzz_dir / 'Cargo.toml')}; available: "
            f"{', '.join(sorted(project.targets))}"
        )
    return target_name


def prepare_build(root: Path, target_name: str | None, *, sanitizer: str) -> FuzzBuild:
    """Find the project, its target, a toolchain and libFuzzer, and lay out the run's
    directories in the workspace (the patched libfuzzer-sys crate, ``CARGO_HOME``, the
    target's corpus and crash directories)."""
    project = find_project(root)
    target_name = _choose_target(root, project, target_name)
    toolchain = choose_toolchain(find_toolchains(), want_nightly=sanitizer == "address")
    asan = sanitizer == "address" and toolchain.nightly
    notes: list[str] = []
    if sanitizer == "address" and not asan:
        notes.append(
            "AddressSanitizer needs a nightly toolchain (-Zsanitizer=address) and none is "
            f"installed; built with {toolchain.name} without it: panics, aborts, timeouts "
            "and out-of-memory are found, memory errors in unsafe code may go unnoticed"
        )
    libfuzzer = find_libfuzzer()
    arbitrary = find_debian_arbitrary()
    target_dir = project.fuzz_dir / "target"
    support = target_dir / "forgespace"
    support.mkdir(parents=True, exist_ok=True)
    crate = _patched_crate(support, arbitrary)
    cargo_home = support / "cargo-home"
    cargo_home.mkdir(exist_ok=True)
    corpus = project.fuzz_dir / "corpus" / target_name
    artifacts = project.fuzz_dir / "artifacts" / target_name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    triple = host_triple()
    extra_ro = [toolchain.root, libfuzzer.parent]
    if arbitrary is not None:
        extra_ro.append(DEBIAN_CRATES)
    return FuzzBuild(
        root=root,
        project=project,
        target_name=target_name,
        toolchain=toolchain,
        asan=asan,
        notes=notes,
        libfuzzer=libfuzzer,
        crate=crate,
        cargo_home=cargo_home,
        target_dir=target_dir,
        corpus=corpus,
        artifacts=artifacts,
        binary=target_dir / triple / "release" / target_name,
        triple=triple,
        extra_ro=extra_ro,
    )


def _build_env(build: FuzzBuild) -> dict[str, str]:
    """cargo's environment: everything it writes stays in the run's copy of the target."""
    rustflags = [*COVERAGE_FLAGS, "-Cdebuginfo=line-tables-only"]
    if build.asan:
        rustflags.append("-Zsanitizer=address")
    env = sandbox.tool_env(
        {
            "CARGO_HOME": str(build.cargo_home),
            "CARGO_TARGET_DIR": str(build.target_dir),
            "CARGO_TERM_COLOR": "never",
            "CARGO_TERM_PROGRESS_WHEN": "never",
            "CARGO_INCREMENTAL": "0",
            # Symbolised frames in panic backtraces and sanitizer reports (cargo strips
            # debug info from release builds unless the profile keeps it).
            "CARGO_PROFILE_RELEASE_DEBUG": "line-tables-only",
            "RUSTC": str(build.toolchain.rustc),
            "RUSTFLAGS": " ".join(rustflags),
            "CUSTOM_LIBFUZZER_PATH": str(build.libfuzzer),
        }
    )
    env["PATH"] = os.pathsep.join([str(build.toolchain.cargo.parent), env["PATH"]])
    return env


def _build_command(build: FuzzBuild) -> list[str]:
    return [
        str(build.toolchain.cargo),
        "build",
        "--offline",
        "--release",
        "--manifest-path",
        str(build.fuzz_dir / "Cargo.toml"),
        "--bin",
        build.target_name,
        "--target",
        build.triple,
        "--config",
        f"patch.crates-io.libfuzzer-sys.path={str(build.crate)!r}",
    ]


def _build_target(
    build: FuzzBuild, box: sandbox.Sandbox, stats: dict[str, Any], throttle: Throttle
) -> float:
    """Run cargo build in the sandbox, heartbeating; returns its duration in seconds."""
    started = time.monotonic()
    throttle(dict(stats), force=True)
    output: list[str] = []
    tool = box.popen(
        _build_command(build),
        workspace=build.root,
        writable=True,
        cwd=build.fuzz_dir,
        env=_build_env(build),
        limits=sandbox.DEFAULT_LIMITS,
        extra_ro=build.extra_ro,
    )
    killed = pump_lines(
        tool.proc,
        output.append,
        lambda: throttle(dict(stats)),
        deadline=started + BUILD_TIMEOUT_SECONDS,
    )
    tool.check_started(output[-20:])
    tool.close()
    if killed:
        raise ToolError(
            f"cargo build of the fuzz target {build.target_name!r} took longer than "
            f"{BUILD_TIMEOUT_SECONDS} s and was stopped"
        )
    if tool.proc.returncode != 0 or not build.binary.is_file():
        raise _build_error(output, build.target_name, tool.proc.returncode, sandbox_note(tool))
    return time.monotonic() - started


class FuzzCampaign:
    """The fuzzing phase: libFuzzer started again after each crash until the budget is
    spent, enough distinct crashes are found, or the same crash keeps coming back.

    ``stopped`` says which (``timeout``, ``max_iterations``, ``killed_at_deadline``,
    ``max_crashes``, ``repeated_crash``); ``findings`` maps a crash signature to its finding.
    """

    def __init__(
        self,
        build: FuzzBuild,
        budget: FuzzBudget,
        box: sandbox.Sandbox,
        stats: dict[str, Any],
        throttle: Throttle,
    ) -> None:
        self.build = build
        self.budget = budget
        self.box = box
        self.stats = stats
        self.throttle = throttle
        self.env = sandbox.tool_env(
            {
                "RUST_BACKTRACE": "1",
                # LeakSanitizer is off: leaks are not memory-safety bugs in Rust, and it needs
                # ptrace, which the sandbox's user namespace does not give it reliably.
                "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:symbolize=1",
            }
        )
        self.limits = sandbox.DEFAULT_LIMITS
        if build.asan:
            # ASan reserves terabytes of shadow address space; memory stays bounded by
            # libFuzzer's -rss_limit_mb instead.
            self.limits = self.limits.with_(address_space=None)
        self.findings: dict[str, dict[str, Any]] = {}
        self.crashes_total = 0
        self.repeats = 0
        self.executed = 0
        self.restarts = 0
        self.stopped = "timeout"
        self.started = time.monotonic()
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    def run(self) -> None:
        """Start libFuzzer until a stop reason comes up (recorded in ``stopped``)."""
        self.started = time.monotonic()
        deadline = self.started + self.budget.timeout_seconds
        while True:
            remaining = deadline - time.monotonic()
            runs_left = self.budget.max_iterations - self.executed
            if remaining < 1:
                self.stopped = "timeout"
                return
            if runs_left <= 0:
                self.stopped = "max_iterations"
                return
            stop = self._fuzz_once(runs_left, remaining)
            if stop is not None:
                self.stopped = stop
                return

    def _fuzzer_args(self, runs_left: int, remaining: float) -> list[str]:
        args = [
            str(self.build.binary),
            f"-runs={runs_left}",
            f"-max_total_time={max(1, int(remaining))}",
            f"-timeout={min(self.budget.timeout_seconds, 25)}",
            "-rss_limit_mb=2048",
            "-detect_leaks=0",
            "-print_final_stats=1",
            f"-artifact_prefix={self.build.artifacts}{os.sep}",
        ]
        if self.budget.max_len is not None:
            args.append(f"-max_len={self.budget.max_len}")
        args.append(str(self.build.corpus))
        return args

    def _fuzz_once(self, runs_left: int, remaining: float) -> str | None:
        """One libFuzzer process; the reason to stop, or None to start another one."""
        out = FuzzerOutput(self.stats, self.executed, self.tail)
        tool = self.box.popen(
            self._fuzzer_args(runs_left, remaining),
            workspace=self.build.root,
            writable=True,
            cwd=self.build.fuzz_dir,
            env=self.env,
            limits=self.limits,
            extra_ro=self.build.extra_ro,
        )
        killed = pump_lines(
            tool.proc,
            out.feed,
            lambda: self.throttle.lazy(lambda: _live(self.stats, self.started)),
            deadline=time.monotonic() + remaining + GRACE_SECONDS,
        )
        tool.check_started(self.tail)
        tool.close()
        self.restarts += 1
        self.executed = out.base + out.executions
        if killed:
            return "killed_at_deadline"
        crash_files = [a for a in out.artifacts if not Path(a).name.startswith("slow-unit-")]
        if not crash_files:
            if tool.proc.returncode != 0:
                raise ToolError(
                    f"the fuzz target {self.build.target_name!r} exited with code "
                    f"{tool.proc.returncode}{sandbox_note(tool)}:\n" + "\n".join(self.tail)
                )
            return "max_iterations" if self.executed >= self.budget.max_iterations else "timeout"
        return self._record_crash(Path(crash_files[0]), out.report)

    def _record_crash(self, path: Path, report: list[str]) -> str | None:
        """Count a crash (a new finding, or one more of a known one); the reason to stop."""
        self.crashes_total += 1
        self.stats["crashes"] = self.crashes_total
        build = self.build
        if not path.is_absolute():
            path = build.fuzz_dir / path
        info = analyse_report(report, path.name.split("-", 1)[0])
        known = self.findings.get(info["signature"])
        if known is not None:
            known["count"] += 1
            self.repeats += 1
        else:
            self.repeats = 0
            self.findings[info["signature"]] = _finding(
                build.root, build.fuzz_dir, build.binary, build.target_name, path, info, report
            )
        self.throttle(_live(self.stats, self.started), force=True)
        if self.budget.max_crashes and len(self.findings) >= self.budget.max_crashes:
            return "max_crashes"
        if self.repeats >= REPEAT_LIMIT:
            return "repeated_crash"
        return None


def _fuzz_result(
    build: FuzzBuild, campaign: FuzzCampaign, live: dict[str, Any], build_seconds: float
) -> dict[str, Any]:
    """The tool's return value (the activity's result)."""
    found = list(campaign.findings.values())
    try:
        corpus_files = sum(1 for _ in build.corpus.iterdir())
    except OSError:
        corpus_files = 0
    return {
        "target_name": build.target_name,
        "fuzz_targets": sorted(build.project.targets),
        "toolchain": build.toolchain.name,
        "sanitizer": "address" if build.asan else "none",
        "libfuzzer": str(build.libfuzzer),
        "notes": build.notes,
        "build_seconds": round(build_seconds, 3),
        "executions": live["executions"],
        "exec_per_sec": live["exec_per_sec"],
        "coverage": live["coverage"],
        "corpus_size": corpus_files,
        "duration_seconds": round(time.monotonic() - campaign.started, 3),
        "stopped": campaign.stopped,
        "fuzzer_starts": campaign.restarts,
        "crashes_total": campaign.crashes_total,
        "unique_crashes": len(found),
        "corpus_dir": _rel(build.root, build.corpus),
        "crash_dir": _rel(build.root, build.artifacts),
        "findings": found,
        "sarif": to_sarif(found),
    }


def _live(stats: dict[str, Any], started: float) -> dict[str, Any]:
    elapsed = max(time.monotonic() - started, 1e-6)
    out = {k: stats[k] for k in LIVE_KEYS}
    out["exec_per_sec"] = round(stats["executions"] / elapsed, 1)
    return out


def _finding(
    root: Path,
    fuzz_dir: Path,
    binary: Path,
    target: str,
    path: Path,
    info: dict[str, Any],
    report: list[str],
) -> dict[str, Any]:
    data = path.read_bytes()
    crash_file = _rel(root, path)
    stack = [
        {**f, "file": _rel(root, f["file"], cwd=fuzz_dir) if f["file"] else ""}
        for f in info["stack"]
    ]
    location = info["location"]
    if location and ":" in location:
        file, _, line = location.rpartition(":")
        location = f"{_rel(root, file, cwd=fuzz_dir)}:{line}"
    return {
        "kind": info["kind"],
        "signature": info["signature"],
        "message": info["message"],
        "location": location,
        "stack": stack,
        "report": "\n".join(report),
        "input_base64": base64.b64encode(data).decode(),
        "input_size": len(data),
        "crash_file": crash_file,
        "count": 1,
        # From the target's root: cargo-fuzz's way, and the built binary itself.
        "reproduce": f"cargo fuzz run {target} {crash_file}",
        "reproduce_binary": f"{_rel(root, binary)} {crash_file}",
    }


def to_sarif(findings: list[dict[str, Any]]) -> dict[str, Any]:
    """One SARIF run: a result per distinct crash, at its location (else its crash file)."""
    table = sarif.RuleTable()
    results = []
    for f in findings:
        rule_id = f"rust-fuzz/{f['kind'].replace(' ', '-')}"
        severity = "medium" if f["kind"] in ("timeout", "oom", "slow-unit") else "high"
        index = table.index(
            rule_id,
            lambda f=f, rule_id=rule_id, severity=severity: sarif.rule(
                rule_id,
                f["kind"],
                f"libFuzzer found an input that makes the fuzz target fail: {f['kind']}",
                severity=severity,
            ),
        )
        uri, line = f["crash_file"], None
        if f["location"] and not f["location"].startswith("/"):
            file, _, num = f["location"].rpartition(":")
            uri, line = file, int(num) if num.isdigit() else None
        results.append(
            sarif.result(
                rule_id,
                index,
                severity,
                f"{f['message']} (input: {f['crash_file']}; reproduce: {f['reproduce']})",
                uri,
                line=line,
                properties={"signature": f["signature"], "count": f["count"]},
            )
        )
    return sarif.log(
        [
            sarif.run(
                "cargo-fuzz (libFuzzer)",
                version=None,
                information_uri="https://rust-fuzz.github.io/book/cargo-fuzz.html",
                rules=table.rules,
                results=results,
            )
        ]
    )
