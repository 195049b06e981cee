"""The tool sandbox itself: what a sandboxed process can and cannot reach, as root.

Every probe is the attack itself, checked from inside (the command's exit code) and from the
host (what exists afterwards). Needs bubblewrap with user namespaces: skipped with the reason
only where the kernel refuses them (``.ci/run`` installs bubblewrap).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.userns import userns_refusal

from forgespace import sandbox
from forgespace.config import Settings
from forgespace.errors import ConfigError, SandboxStartError, SandboxUnavailableError


@pytest.fixture(autouse=True)
def fresh_sandbox_state() -> Iterator[None]:
    """Each test probes and configures on its own (the module caches per process)."""
    saved = (sandbox._current, sandbox._probed)
    sandbox._current = sandbox._probed = None
    yield
    sandbox._current, sandbox._probed = saved


@pytest.fixture
def box(tmp_path: Path) -> sandbox.Sandbox:
    refusal = userns_refusal()
    if refusal:
        pytest.skip(f"user namespaces are refused here: {refusal}")
    settings = Settings.from_env({"CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    b = sandbox.configure(settings.with_(sandbox="bwrap"))
    assert b.active
    return b


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    (c / ".forgespace").mkdir(parents=True)
    (c / ".forgespace" / "index.sqlite").write_bytes(b"SQLite format 3\0secret")
    (c / "other" / "r9" / "workspace").mkdir(parents=True)
    (c / "other" / "r9" / "workspace" / "code.py").write_text("PRIVATE = 1\n")
    return c


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A workspace outside any cache."""
    p = tmp_path / "plain"
    p.mkdir()
    return p


def run_py(
    box: sandbox.Sandbox, workspace: Path, code: str, *, writable: bool = True, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return box.run(
        [sys.executable, "-c", code],
        workspace=workspace,
        writable=writable,
        cwd=workspace,
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


def test_setting_is_parsed_and_a_bad_value_is_refused() -> None:
    assert Settings.from_env({}).sandbox == "auto"
    assert Settings.from_env({"FORGESPACE_SANDBOX": "BWRAP"}).sandbox == "bwrap"
    with pytest.raises(ConfigError, match=r"FORGESPACE_SANDBOX.*auto, bwrap, none"):
        Settings.from_env({"FORGESPACE_SANDBOX": "docker"})


def test_bwrap_mode_fails_with_the_reason_when_bwrap_cannot_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap to be found
    settings = Settings.from_env({"CACHE_DIR": str(tmp_path / "c"), "FORGESPACE_SANDBOX": "bwrap"})
    with pytest.raises(SandboxUnavailableError, match="bwrap not found on PATH"):
        sandbox.configure(settings)


def test_auto_falls_back_with_one_loud_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = Settings.from_env({"CACHE_DIR": str(tmp_path / "c")})
    with caplog.at_level(logging.WARNING, logger="forgespace.sandbox"):
        b = sandbox.configure(settings)
    assert not b.active
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "UNSANDBOXED" in warnings[0].getMessage()
    assert "bwrap not found" in warnings[0].getMessage()
    # Unsandboxed tools still run (and still get the reduced environment).
    (tmp_path / "ws").mkdir()
    done = run_py(b, tmp_path / "ws", "print('ran')")
    assert done.stdout.strip() == b"ran"


def test_workspace_is_the_only_project_data_visible(
    box: sandbox.Sandbox, cache: Path, tmp_path: Path
) -> None:
    ws = cache / "tgt" / "r1" / "workspace"
    ws.mkdir(parents=True)
    sentinel = tmp_path / "host-secret.txt"
    sentinel.write_text("host data")
    code = f"""
import os, sys
denied = []
def attempt(name, fn):
    try:
        fn()
    except OSError:
        denied.append(name)
attempt("index", lambda: open({str(cache / ".forgespace" / "index.sqlite")!r}, "rb").read())
attempt("other-run", lambda: os.listdir({str(cache / "other" / "r9" / "workspace")!r}))
attempt("host-file", lambda: open({str(sentinel)!r}).read())
attempt("shadow", lambda: open("/etc/shadow").read())
names = os.listdir({str(cache)!r})
assert names == ["tgt"], names
assert os.geteuid() == 65534 and os.getegid() == 65534
print(",".join(denied))
"""
    done = run_py(box, ws, code)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip().split(",") == [
        "index",
        "other-run",
        "host-file",
        "shadow",
    ]


def test_writes_land_only_in_the_workspace_and_belong_to_the_worker(
    box: sandbox.Sandbox, cache: Path, tmp_path: Path
) -> None:
    ws = cache / "tgt" / "r1" / "workspace"
    ws.mkdir(parents=True)
    outside = [
        cache / "escaped",
        cache / ".forgespace" / "escaped",
        cache / "other" / "r9" / "workspace" / "escaped",
        tmp_path / "escaped",
        Path("/escaped-from-sandbox"),
    ]
    code = f"""
import os
for p in {[str(p) for p in outside]!r}:
    try:
        open(p, "w").write("x")
    except OSError:
        continue
    raise SystemExit("wrote " + p)
os.makedirs("made/deeper")
open("made/deeper/out.txt", "w").write("inside")
open("/tmp/private", "w").write("tmpfs")
"""
    done = run_py(box, ws, code)
    assert done.returncode == 0, done.stderr.decode()
    assert not any(p.exists() for p in outside)
    assert not Path("/tmp/private").exists()
    made = ws / "made" / "deeper" / "out.txt"
    assert made.read_text() == "inside"
    assert made.stat().st_uid == os.getuid()  # the sandbox uid maps to the worker's
    shutil.rmtree(ws / "made")  # the worker cleans up what the tool wrote
    assert not (ws / "made").exists()


def test_shared_workspace_is_read_only_even_for_a_root_worker(
    box: sandbox.Sandbox, cache: Path
) -> None:
    shared = cache / "tgt" / "workspace"
    shared.mkdir(parents=True)
    (shared / "code.py").write_text("x = 1\n")
    assert os.geteuid() == 0 or pytest.skip("the point is that root bypasses the modes")
    code = """
for p in ("new.txt", "code.py"):
    try:
        open(p, "a").write("x")
    except OSError as e:
        print(e.strerror)
        continue
    raise SystemExit("wrote " + p)
"""
    # The caller asks for a writable workspace: the layout says shared, so it stays read-only.
    done = run_py(box, shared, code, writable=True)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().count("Read-only file system") == 2
    assert sorted(p.name for p in shared.iterdir()) == ["code.py"]
    assert (shared / "code.py").read_text() == "x = 1\n"


def test_no_network_fails_fast_instead_of_hanging(box: sandbox.Sandbox, plain: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""
import socket
for fn in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=20),
           lambda: socket.getaddrinfo("example.com", 443)):
    try:
        fn()
    except OSError as e:
        print(type(e).__name__)
        continue
    raise SystemExit("network reachable")
"""
    with listener:
        done = run_py(box, plain, code)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().split() == ["ConnectionRefusedError", "gaierror"]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's listening socket


def test_worker_secrets_do_not_reach_the_tool(
    box: sandbox.Sandbox, plain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("S3_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    done = box.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"],
        workspace=plain,
        writable=False,
        env=sandbox.tool_env(),
        timeout=60,
    )
    assert b"do-not-leak" not in done.stdout and b"SECRET" not in done.stdout


def test_timeout_kills_everything_the_tool_started(box: sandbox.Sandbox, plain: Path) -> None:
    # A grandchild in its own session that ignores SIGTERM and holds the output pipe open:
    # only killing the sandbox's PID namespace ends it, and then the pipe reaches EOF.
    code = (
        "import os, signal, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
        "start_new_session=True)\n"
        "print('started', flush=True); time.sleep(600)\n"
    )
    tool = box.popen([sys.executable, "-c", code], workspace=plain, writable=False)
    assert tool.proc.stdout is not None
    assert tool.proc.stdout.readline().strip() == b"started"
    sandbox.kill_tool(tool)
    # EOF within the bound: no process of the sandbox still holds the pipe.
    rest = subprocess.run(["timeout", "20", "cat"], stdin=tool.proc.stdout, capture_output=True)
    assert rest.returncode == 0, "a process of the killed sandbox still holds its output"
    tool.close()


def test_a_sandbox_that_cannot_start_says_why(box: sandbox.Sandbox, plain: Path) -> None:
    with pytest.raises(SandboxStartError, match="the tool's sandbox could not start: bwrap:"):
        box.run(
            [sys.executable, "-V"],
            workspace=plain,
            writable=False,
            cwd=plain / "no-such-dir",
            timeout=60,
        )


def test_limits_hold_inside(box: sandbox.Sandbox, plain: Path) -> None:
    code = """
try:
    b = bytearray(1536 * 2**20)
    raise SystemExit("allocated past the address-space limit")
except MemoryError:
    print("MemoryError")
try:
    open("big", "wb").write(b"x" * (2 * 2**20))
    raise SystemExit("wrote past the file-size limit")
except OSError as e:
    print(e.errno)
"""
    limits = sandbox.Limits(address_space=1024 * 2**20, file_size=2**20)
    done = run_py(box, plain, code, limits=limits)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["MemoryError", "27"]  # 27 = EFBIG


def test_cache_dir_itself_is_never_a_workspace(box: sandbox.Sandbox, cache: Path) -> None:
    with pytest.raises(ValueError, match="contains the cache directory"):
        run_py(box, cache, "print(1)")
    with pytest.raises(ValueError, match="cache bookkeeping"):
        run_py(box, cache / ".forgespace", "print(1)")


def test_a_checkout_under_tmp_is_visible_read_only_inside(
    box: sandbox.Sandbox, plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone under /tmp (a CI checkout) puts the venv and src/ on sys.path below /tmp, which
    the sandbox's private /tmp would hide: the tool's interpreter could not even start, and
    `auto` would fall back to running tools unsandboxed. Such paths are bound read-only."""
    lib = tmp_path / "checkout" / "src"
    lib.mkdir(parents=True)
    (lib / "under_tmp_mod.py").write_text("VALUE = 'seen'\n")
    assert str(lib).startswith("/tmp/")
    monkeypatch.syspath_prepend(str(lib))
    fresh = sandbox.Sandbox(box.status, bwrap=box.bwrap, hidden=box.hidden)
    code = (
        "import sys, under_tmp_mod\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "print(under_tmp_mod.VALUE)\n"
        f"open({str(lib / 'planted.py')!r}, 'w')\n"
    )
    env = sandbox.tool_env({"PYTHONPATH": str(lib)})
    done = run_py(fresh, plain, code, env=env)
    assert done.stdout.strip() == b"seen", done.stderr
    assert b"Read-only file system" in done.stderr  # visible, never writable
    assert not (lib / "planted.py").exists()
