# Over 500 lines on purpose: everything a tool's jail is made of (binds, limits, environment,
# probe, start, kill) in one module, so a security review reads it in one place.
"""Run a workflow's external tools in a bubblewrap sandbox that sees only their workspace.

Every tool a workflow starts (a fuzz harness, bandit, detect-secrets, a target's own test
suite...) is untrusted code reading untrusted input. ``Sandbox.popen``/``Sandbox.run`` start it
under ``bwrap`` (Flatpak's bubblewrap) with:

- the run's workspace as the only project data, bound at the path it has on the host (so paths
  in findings stay true): read-write for an isolated or copy-on-write run, read-only for a
  shared workspace (decided from the cache layout, whatever the caller asks), and for a
  read-only tool;
- read-only binds of what the interpreter needs: ``/usr`` (``/bin``, ``/lib*``, ``/sbin`` as on
  the host), a few files of ``/etc`` (``ld.so.cache``, ``passwd``, ``ssl/certs``... never
  ``shadow`` or ``ssl/private``), the interpreter's prefix, the venv and the directories on
  ``sys.path`` (an editable install's ``src/``); never CACHE_DIR, its ``.forgespace/``
  bookkeeping, other targets or other runs, and nothing under ``/home``, ``/root`` or ``/tmp``
  beyond those and what the caller names in ``extra_ro`` (read-only, never the cache: e.g.
  cargo_fuzzing's one Rust toolchain directory under ``~/.rustup``);
- a private tmpfs ``/tmp``, its own ``/proc`` and a minimal ``/dev``; the root is read-only;
- new user, PID, IPC, UTS, cgroup and network namespaces (no network at all: a connect or DNS
  lookup fails at once), ``--die-with-parent``, ``--new-session``, uid/gid 65534 inside and no
  capabilities (``--cap-drop ALL``);
- resource limits (``Limits``: address space, CPU seconds, file size, processes) set with
  ``prlimit`` on the sandbox, inherited by everything in it;
- an environment reduced to an allow-list: the worker's credentials (``S3_SECRET_KEY``,
  ``AWS_*``...) never reach a tool, sandboxed or not.

User mapping: bubblewrap maps the sandbox's uid 65534 to the uid that started it (the worker's,
often root) and to nothing else. Files a tool creates in its workspace therefore belong to the
worker on the host, which reads and removes them as before; inside, the workspace is writable
because the sandbox user owns what the worker owns, and *only* the workspace is writable because
every other bind is a read-only mount (a read-only mount refuses even the owner). The price:
inside, files the worker owns with owner-only modes are readable where they are bound, which is
why ``/etc`` is bound file by file. The kernel exempts uid 0 from ``RLIMIT_NPROC``, so the
process limit only holds for a worker that does not run as root.

Settings (``FORGESPACE_SANDBOX``): ``auto`` probes bubblewrap once per process (a real sandboxed
interpreter start) and falls back to running tools directly with one loud warning when it does
not work; ``bwrap`` raises ``SandboxUnavailableError`` with the reason instead; ``none`` runs
tools directly. ``configure(settings)`` (the worker calls it at start-up) sets the process's
sandbox; tools take it from ``current()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from forgespace.config import Settings
from forgespace.errors import ConfigError, SandboxStartError, SandboxUnavailableError

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "Sandbox",
    "SandboxStatus",
    "ToolProcess",
    "configure",
    "current",
    "kill_tool",
    "probe",
    "tool_env",
]

log = logging.getLogger(__name__)

SANDBOX_UID = 65534
SANDBOX_GID = 65534
# /etc entries a tool may need (dynamic linker, user names, time zone, TLS roots, the
# alternatives symlinks some /usr/bin entries point through). Never shadow or ssl/private.
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "mime.types",
)
# Top-level system directories, bound (or re-created as the same symlink) read-only.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Environment variables a tool inherits from the worker; everything else is left out.
ENV_ALLOWED = frozenset({"LANG", "LANGUAGE", "TZ", "TERM", "PYTHONHASHSEED", "PYTHONPATH"})
ENV_ALLOWED_PREFIXES = ("LC_", "ASAN_", "UBSAN_", "LSAN_", "MSAN_")
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed tool (``None`` = unlimited).

    The defaults let a Python fuzzer live (atheris without ASan stays well below 8 GiB of
    address space) while stopping a runaway: ``address_space`` bytes (RLIMIT_AS),
    ``cpu_seconds`` (RLIMIT_CPU, per process; the tool's wall-clock timeout is the usual stop),
    ``file_size`` bytes for any one file written (RLIMIT_FSIZE), ``processes`` (RLIMIT_NPROC,
    counted per user: not enforced for a worker running as root).
    """

    address_space: int | None = 8 * 2**30
    cpu_seconds: int | None = 4 * 3600
    file_size: int | None = 4 * 2**30
    processes: int | None = 1024

    def with_(self, **changes: Any) -> Limits:
        """A copy with some limits changed."""
        return replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Limits:
        """Limits from a JSON-able mapping (a workflow parameter); unknown keys are refused."""
        if not values:
            return cls()
        fields = ("address_space", "cpu_seconds", "file_size", "processes")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown sandbox limit(s) {', '.join(unknown)}; accepted: {', '.join(fields)}"
            )
        out: dict[str, int | None] = {}
        for name, value in values.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(
                    f"sandbox limit {name} must be a positive integer or null, got {value!r}"
                )
            out[name] = value
        return replace(cls(), **out)

    def prlimit_args(self) -> list[str]:
        """``prlimit`` options setting these limits (soft = hard)."""
        args = []
        for opt, value in (
            ("--as", self.address_space),
            ("--cpu", self.cpu_seconds),
            ("--fsize", self.file_size),
            ("--nproc", self.processes),
        ):
            if value is not None:
                args.append(f"{opt}={value}")
        return args


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SandboxStatus:
    """The start-up probe's verdict: what ``FORGESPACE_SANDBOX`` asked for and what runs."""

    mode: str
    active: bool
    detail: str

    def describe(self) -> str:
        """One line for the worker's start-up log and `forgespace run`'s summary."""
        if self.active:
            return f"sandbox: bubblewrap ({self.detail})"
        if self.mode == "none":
            return "sandbox: none (FORGESPACE_SANDBOX=none): tools run unsandboxed"
        return (
            "sandbox: NONE - bubblewrap does not work on this host, tools run UNSANDBOXED "
            f"with the worker's rights ({self.detail}); set FORGESPACE_SANDBOX=bwrap to "
            "refuse to start instead, or =none to silence this"
        )


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a tool: the allow-listed variables of ours, plus ``extra``.

    ``HOME`` and ``TMPDIR`` point at ``/tmp`` (private inside the sandbox).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)
    }
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, "/usr/local/bin", "/usr/bin", "/bin"])
    env.setdefault("LANG", "C.UTF-8")
    env["HOME"] = "/tmp"
    env["TMPDIR"] = "/tmp"
    env["USER"] = env["LOGNAME"] = "nobody"
    if extra:
        env.update(extra)
    return env


_TMP = Path("/tmp")


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _tmp_shields(binds: Sequence[str]) -> list[Path]:
    """Top directories under /tmp to cover with a read-only tmpfs.

    A bind deep below /tmp gets its mount point created in the private (writable) /tmp: its
    parents there (e.g. a CACHE_DIR under /tmp) would be writable, if invisible to the host.
    A read-only tmpfs over their top directory makes them refuse writes too.
    """
    return sorted(
        {
            _TMP / Path(d).relative_to(_TMP).parts[0]
            for d in binds[2::3]
            if _inside(Path(d), _TMP) and len(Path(d).relative_to(_TMP).parts) > 1
        }
    )


def _popen_direct(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    limits: Limits,
    *,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None,
) -> ToolProcess:
    """Start a tool unsandboxed (the sandbox is off), still in its own session."""
    # Limits through prlimit too: a preexec_fn is unsafe in the threaded worker.
    direct = list(argv)
    if shutil.which("prlimit") is not None:
        direct = ["prlimit", *limits.prlimit_args(), "--core=0", "--", *direct]
    proc = subprocess.Popen(
        direct,
        cwd=str(cwd) if cwd is not None else None,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    return ToolProcess(proc, None, sandboxed=False)


class ToolProcess:
    """A started tool: ``proc`` (its ``Popen``) and whether its sandbox came up.

    Under bubblewrap, ``proc`` is bwrap itself; killing its process group kills the sandbox's
    PID namespace, and with it everything the tool started.
    """

    def __init__(
        self, proc: subprocess.Popen[bytes], status_fd: int | None, sandboxed: bool
    ) -> None:
        self.proc = proc
        self.sandboxed = sandboxed
        self._status_fd = status_fd
        self._status: str | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_status(self) -> str:
        with self._lock:
            if self._status is None:
                chunks = []
                if self._status_fd is not None:
                    with contextlib.suppress(OSError):
                        while chunk := os.read(self._status_fd, 65536):
                            chunks.append(chunk)
                    os.close(self._status_fd)
                    self._status_fd = None
                self._status = b"".join(chunks).decode("utf-8", "replace")
            return self._status

    def check_started(self, output_tail: Iterable[str] = ()) -> None:
        """After the process ended: raise ``SandboxStartError`` when the sandbox never ran
        the tool (bwrap failed to set it up or to exec the program).

        bubblewrap reports the tool's exit code on its status fd only when the tool ran, so
        this needs no guessing from output; the tail is used for the message only.
        """
        if not self.sandboxed or self.proc.returncode is None:
            return
        if self.proc.returncode < 0:
            return  # killed by us (timeout, cancellation): not a start failure
        if '"exit-code"' in self._read_status():
            return
        reason = next(
            (ln.strip() for ln in reversed(list(output_tail)) if ln.startswith("bwrap:")),
            f"bwrap exited with code {self.proc.returncode} before the tool ran",
        )
        raise SandboxStartError(f"the tool's sandbox could not start: {reason}", reason=reason)

    def close(self) -> None:
        """Release the status pipe (called once the process has ended)."""
        self._read_status()


def kill_tool(tool: ToolProcess | subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a tool started with a new session, and reap it."""
    proc = tool.proc if isinstance(tool, ToolProcess) else tool
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Sandbox:
    """Starts tools sandboxed (``status.active``) or directly; see the module docstring.

    ``hidden`` are directories that must never be visible inside (CACHE_DIR): a bind of one
    of them or of anything containing them is refused.
    """

    def __init__(
        self,
        status: SandboxStatus,
        *,
        bwrap: str | None = None,
        hidden: Sequence[Path] = (),
    ) -> None:
        self.status = status
        self.bwrap = bwrap
        self.hidden = tuple(Path(os.path.realpath(h)) for h in hidden)
        self._system_args: list[str] | None = None

    @property
    def active(self) -> bool:
        return self.status.active

    # -- what is visible -------------------------------------------------------------------

    def _allowed_ro(self, path: Path) -> bool:
        """A read-only bind must not expose a hidden directory or lie inside one."""
        return not any(_inside(h, path) or _inside(path, h) for h in self.hidden)

    def _runtime_paths(self) -> list[Path]:
        """The interpreter, its stdlib, the venv and sys.path entries (editable src/)."""
        import forgespace

        candidates = [
            sys.prefix,
            sys.exec_prefix,
            sys.base_prefix,
            sys.base_exec_prefix,
            str(Path(os.path.realpath(sys.executable)).parent.parent),
            str(Path(forgespace.__file__).resolve().parent.parent),
            *[p for p in sys.path if p],
        ]
        out: list[Path] = []
        for c in candidates:
            p = Path(os.path.realpath(c))
            if not p.exists() or p == Path("/") or p == _TMP:
                continue
            if any(_inside(p, Path("/", d)) for d in SYSTEM_DIRS):
                continue  # already bound as a system directory
            if not self._allowed_ro(p):
                log.debug("sandbox: not binding %s (it would expose the cache)", p)
                continue
            out.append(p)
        # Drop paths below another one: the outer bind already shows them.
        out = sorted(set(out), key=lambda p: (len(p.parts), str(p)))
        kept: list[Path] = []
        for p in out:
            if not any(_inside(p, k) for k in kept):
                kept.append(p)
        return kept

    def _system_binds(self) -> list[str]:
        if self._system_args is not None:
            return list(self._system_args)
        args: list[str] = []
        for d in SYSTEM_DIRS:
            host = Path("/", d)
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        for e in ETC_ENTRIES:
            host = Path("/etc", e)
            if host.exists():
                args += ["--ro-bind", str(host), str(host)]
        for p in self._runtime_paths():
            if not _inside(p, _TMP):  # those go after the private /tmp's shields (command())
                args += ["--ro-bind", str(p), str(p)]
        self._system_args = args
        return list(args)

    def workspace_bind(self, workspace: str | os.PathLike[str], *, writable: bool) -> list[str]:
        """bwrap options binding ``workspace`` at its own path.

        A shared workspace (``{CACHE_DIR}/{tid}/workspace``) or copy-on-write's shared copy is
        always read-only. A writable single-file target binds its run directory (tools write
        beside the file); a read-only one binds the file alone.
        """
        path = Path(os.path.abspath(workspace))
        real = Path(os.path.realpath(path))
        for h in self.hidden:
            if _inside(h, real):
                raise ValueError(
                    f"refusing to sandbox a tool with {str(path)!r} as its workspace: it "
                    f"contains the cache directory {str(h)!r}"
                )
            if _inside(real, h) and writable and not _is_run_path(real, h):
                writable = False  # shared workspace or shared copy: read-only for everyone
            if _inside(real, h / ".forgespace"):
                raise ValueError(
                    f"refusing to sandbox a tool in {str(path)!r}: that is cache bookkeeping"
                )
        if real.is_file() and writable:
            path, real = path.parent, real.parent
        return ["--bind" if writable else "--ro-bind", str(real), str(path)]

    def command(
        self,
        argv: Sequence[str],
        *,
        workspace: str | os.PathLike[str],
        writable: bool,
        cwd: str | os.PathLike[str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        status_fd: int | None = None,
        extra_ro: Sequence[str | os.PathLike[str]] = (),
    ) -> list[str]:
        """The full command line (prlimit + bwrap + argv) for a sandboxed tool."""
        if self.bwrap is None:
            raise SandboxStartError("bubblewrap is not available", reason="no bwrap")
        args = self._jail_args(self.bwrap, limits)
        binds = self._tool_binds(workspace, writable=writable, extra_ro=extra_ro)
        shields = _tmp_shields(binds)
        for shield in shields:
            args += ["--tmpfs", str(shield)]
        args += binds
        # Nothing outside the binds and /tmp is writable, not even bwrap's own skeleton dirs.
        for ro in ["/", *map(str, shields)]:
            args += ["--remount-ro", ro]
        if cwd is not None:
            args += ["--chdir", str(Path(os.path.abspath(cwd)))]
        if status_fd is not None:
            args += ["--json-status-fd", str(status_fd)]
        return [*args, "--", *argv]

    def _jail_args(self, bwrap: str, limits: Limits) -> list[str]:
        """prlimit and bwrap with what every tool gets: namespaces, uid, no capabilities,
        private /tmp, /proc and /dev, and the read-only system binds."""
        return [
            "prlimit",
            *limits.prlimit_args(),
            "--core=0",
            "--",
            bwrap,
            "--unshare-all",
            "--unshare-user",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_GID),
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            "--tmpfs",
            "/tmp",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            *self._system_binds(),
        ]

    def _tool_binds(
        self,
        workspace: str | os.PathLike[str],
        *,
        writable: bool,
        extra_ro: Sequence[str | os.PathLike[str]],
    ) -> list[str]:
        """The binds of this tool (each three words: option, source, destination): runtime
        paths under /tmp, the caller's ``extra_ro`` and the workspace."""
        binds: list[str] = []
        # A checkout (venv, src/) under /tmp, e.g. a CI clone: bound into the private /tmp.
        for runtime in self._runtime_paths():
            if _inside(runtime, _TMP):
                binds += ["--ro-bind", str(runtime), str(runtime)]
        for p in extra_ro:
            real = Path(os.path.realpath(p))
            if not self._allowed_ro(real):
                raise ValueError(f"refusing to show {str(p)!r} to a tool: it exposes the cache")
            binds += ["--ro-bind", str(real), str(Path(os.path.abspath(p)))]
        binds += self.workspace_bind(workspace, writable=writable)
        return binds

    # -- starting tools --------------------------------------------------------------------

    def popen(
        self,
        argv: Sequence[str],
        *,
        workspace: str | os.PathLike[str],
        writable: bool,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
        extra_ro: Sequence[str | os.PathLike[str]] = (),
    ) -> ToolProcess:
        """Start ``argv`` in the workspace's sandbox (or directly when the sandbox is off).

        The tool gets its own session (process group), so ``kill_tool`` stops all of it;
        ``env`` defaults to ``tool_env()``. Raises ``SandboxStartError`` when bwrap itself
        cannot be executed.
        """
        environ = dict(env) if env is not None else tool_env()
        if not self.active:
            return _popen_direct(argv, cwd, environ, limits, stdout=stdout, stderr=stderr)
        read_fd, write_fd = os.pipe()
        try:
            cmd = self.command(
                argv,
                workspace=workspace,
                writable=writable,
                cwd=cwd,
                limits=limits,
                status_fd=write_fd,
                extra_ro=extra_ro,
            )
            try:
                proc = subprocess.Popen(
                    cmd,
                    env=environ,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    pass_fds=(write_fd,),
                )
            except OSError as exc:
                raise SandboxStartError(
                    f"the tool's sandbox could not start: {exc}", reason=str(exc)
                ) from exc
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return ToolProcess(proc, read_fd, sandboxed=True)

    def run(
        self,
        argv: Sequence[str],
        *,
        workspace: str | os.PathLike[str],
        writable: bool,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        extra_ro: Sequence[str | os.PathLike[str]] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` to completion, capturing stdout and stderr separately.

        Raises ``subprocess.TimeoutExpired`` after killing the whole sandbox at ``timeout``
        seconds, ``SandboxStartError`` when the sandbox did not come up.
        """
        tool = self.popen(
            argv,
            workspace=workspace,
            writable=writable,
            cwd=cwd,
            env=env,
            limits=limits,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            extra_ro=extra_ro,
        )
        try:
            out, err = tool.proc.communicate(timeout=timeout)
        except BaseException:
            kill_tool(tool)
            tool.close()
            raise
        tool.check_started(err.decode("utf-8", "replace").splitlines())
        tool.close()
        return subprocess.CompletedProcess(list(argv), tool.proc.returncode, out, err)


# -- probing and the process's sandbox ---------------------------------------------------------

_PROBE_CODE = """
import os, socket, sys
import forgespace
assert os.getuid() == 65534, os.getuid()
open(os.path.join(sys.argv[1], "probe"), "w").write("ok")
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
    raise SystemExit("network is reachable")
except OSError:
    pass
"""


def probe(bwrap: str | None = None) -> tuple[SandboxStatus, str | None]:
    """Check that bubblewrap works here: start this interpreter in a real sandbox, write into
    a workspace from inside and see the file from outside. Returns the status and bwrap's path.
    """
    path = bwrap or shutil.which("bwrap")
    if path is None:
        return SandboxStatus("auto", False, "bwrap not found on PATH (Debian: bubblewrap)"), None
    if shutil.which("prlimit") is None:
        return SandboxStatus("auto", False, "prlimit not found on PATH (util-linux)"), None
    box = Sandbox(SandboxStatus("auto", True, "probe"), bwrap=path)
    with tempfile.TemporaryDirectory(prefix="forgespace-sandbox-probe-") as tmp:
        # Bound over the sandbox's private /tmp at the same path, like any workspace.
        work = Path(tmp)
        try:
            started = time.monotonic()
            done = box.run(
                [sys.executable, "-c", _PROBE_CODE, str(work)],
                workspace=work,
                writable=True,
                timeout=PROBE_TIMEOUT,
            )
            elapsed = time.monotonic() - started
        except (OSError, SandboxStartError, subprocess.TimeoutExpired) as exc:
            return SandboxStatus("auto", False, f"{path} cannot start a sandbox: {exc}"), None
        if done.returncode != 0 or not (work / "probe").exists():
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()
            why = err[-1] if err else f"exit code {done.returncode}"
            return (
                SandboxStatus("auto", False, f"a sandboxed interpreter failed: {why}"),
                None,
            )
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    detail = f"{version or path}, interpreter start {elapsed * 1000:.0f} ms"
    return SandboxStatus("auto", True, detail), path


def _is_run_path(real: Path, cache_dir: Path) -> bool:
    """Whether ``real`` lies in a run directory ``{cache}/{tid}/{rid}/`` (not ``shared``)."""
    parts = real.relative_to(cache_dir).parts
    return len(parts) >= 3 and parts[0] != ".forgespace" and parts[1] != "shared"


_lock = threading.Lock()
_current: Sandbox | None = None
_probed: tuple[SandboxStatus, str | None] | None = None


def configure(settings: Settings, *, warn: bool = True) -> Sandbox:
    """Set up this process's sandbox from ``settings.sandbox`` (probing bwrap once per
    process) and return it. ``auto`` without a working bwrap logs one warning (per call: call
    it once per worker start); ``bwrap`` raises ``SandboxUnavailableError`` with the reason.
    """
    global _current, _probed
    mode = settings.sandbox
    if mode not in ("auto", "bwrap", "none"):
        raise ConfigError(f"invalid FORGESPACE_SANDBOX {mode!r}: expected auto, bwrap or none")
    hidden = [settings.cache_dir]
    if mode == "none":
        box = Sandbox(SandboxStatus("none", False, "opted out"), hidden=hidden)
    else:
        with _lock:
            if _probed is None:
                _probed = probe()
            status, path = _probed
        status = replace(status, mode=mode)
        if not status.active and mode == "bwrap":
            raise SandboxUnavailableError(
                f"FORGESPACE_SANDBOX=bwrap but bubblewrap cannot work on this host: "
                f"{status.detail}. Install bubblewrap and allow user namespaces (see "
                "docs/deployment.md), or set FORGESPACE_SANDBOX=auto or none"
            )
        box = Sandbox(status, bwrap=path, hidden=hidden)
        if warn and not status.active:
            log.warning("!!! %s", status.describe())
    with _lock:
        _current = box
    if box.active or mode == "none":
        log.info("%s", box.status.describe())
    return box


def current() -> Sandbox:
    """The process's sandbox: the one ``configure`` set, else configured from the environment
    (``Settings.from_env()``) on first use."""
    box = _current
    if box is None:
        box = configure(Settings.from_env())
    return box
