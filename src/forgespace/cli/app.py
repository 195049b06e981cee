"""The typer app and the one place errors become exit codes and messages."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from forgespace.config import Settings
from forgespace.errors import (
    ConfigError,
    ForgespaceError,
    InvalidIdError,
    InvalidModeError,
    LockTimeoutError,
    TargetNotFoundError,
    UnsafeArchiveError,
    WorkflowMetadataError,
    WorkflowParameterError,
)

app = typer.Typer(
    name="forgespace",
    help="Workspaces for security-analysis workflow runs.",
    no_args_is_help=True,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"forgespace {version('forgespace')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            print("forgespace (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Workspaces for security-analysis workflow runs."""


cache_app = typer.Typer(help="Inspect and steer the workspace cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
store_app = typer.Typer(help="List and prune the object store.", no_args_is_help=True)
app.add_typer(store_app, name="store")

# Human output and progress go to stderr; stdout carries only machine-readable results.
err_console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (TargetNotFoundError, 3),
    (UnsafeArchiveError, 4),
    (LockTimeoutError, 5),
    (ConfigError, 2),
    (InvalidIdError, 2),
    (InvalidModeError, 2),
    (WorkflowMetadataError, 2),
    (WorkflowParameterError, 2),
    (ForgespaceError, 1),
]


# OS errors that mean "this path cannot be used as it is" (permissions, read-only, full, not a
# directory...): a user's or operator's problem, reported in one line, never a traceback.
USER_OS_ERRNOS = frozenset(
    {
        errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
        errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP,
        errno.ENOTEMPTY, errno.EBUSY,
    }
)  # fmt: skip


def exit_code_for(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return 1


def load_settings() -> Settings:
    """Settings from the environment (the CLI's only configuration source)."""
    return Settings.from_env()


def setup_logging() -> None:
    try:
        level = Settings.from_env().log_level
    except ForgespaceError:
        level = "INFO"  # the command itself reports the invalid variable
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def quiet_logs(verbose: int) -> None:
    """For commands with their own progress output (`run`): the Temporal SDK's and forgespace's
    INFO logs stay hidden (WARNING and above pass) unless ``-v`` (INFO) or ``-vv`` (DEBUG);
    an explicit FORGESPACE_LOG_LEVEL / LOG_LEVEL wins."""
    if os.environ.get("FORGESPACE_LOG_LEVEL") or os.environ.get("LOG_LEVEL"):
        return
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.getLogger().setLevel(level)
    for name in ("temporalio", "forgespace"):
        logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map our errors to exit codes."""
    try:
        _main(argv)
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if "temporalio.bridge" in sys.modules:
        # The Temporal SDK's Rust threads can outlive the event loop and abort the interpreter
        # while it finalizes ("PyGILState_Release: thread state ... must be current", SIGABRT
        # after a clean shutdown; temporalio/sdk-python issue 300). Everything is done and
        # cleaned up by now: flush what we wrote and leave without finalizing.
        _exit_without_finalizing(code)
    sys.exit(code)


def _exit_without_finalizing(code: int | str | None) -> None:
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def _main(argv: list[str] | None) -> None:
    setup_logging()
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)  # non-standalone mode returns typer.Exit(n)'s code instead of raising
    except ForgespaceError as exc:
        # escape: messages quote paths and forms like "[/workspace|/target]" (not markup)
        err_console.print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
        )
        sys.exit(exit_code_for(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except OSError as exc:
        # A path the user pointed us at (STORAGE_DIR, a workspace, a file to upload) that
        # cannot be read or written: one line naming the command, the path and the reason.
        if exc.errno not in USER_OS_ERRNOS:
            raise
        words = [a for a in (sys.argv[1:] if argv is None else argv)[:2] if not a.startswith("-")]
        where = f" {exc.filename}:" if exc.filename is not None else ""
        err_console.print(
            f"[red]error:[/red] {escape(' '.join(['forgespace', *words]))}:{escape(where)} "
            f"{escape(exc.strerror or str(exc))}",
            highlight=False,
            markup=True,
            soft_wrap=True,
        )
        sys.exit(1)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        # typer vendors its own click: its usage errors are TyperException, not click's
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            if getattr(exc, "ctx", None) is not None and _is_help_request(exc):
                exc.show()  # `forgespace cache` alone: the help text, as asked
            else:
                err_console.print(
                    f"[red]error:[/red] {escape(usage_error_line(exc))}",
                    highlight=False,
                    markup=True,
                    soft_wrap=True,
                )
            sys.exit(exc.exit_code)
        raise


def _is_help_request(exc: BaseException) -> bool:
    # click raises NoArgsIsHelpError for a group called without a command (no_args_is_help)
    return type(exc).__name__ == "NoArgsIsHelpError"


def usage_error_line(exc: Any) -> str:
    """One line for a usage error: the command, what was wrong (click's message, which names
    the option and what it accepts), and where to look."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "forgespace"
    message = " ".join(str(exc.format_message()).split())
    hint = f" (see '{command} --help')" if ctx is not None else ""
    return f"{command}: {message}{hint}"
