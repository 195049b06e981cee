"""Measure the code tools run inside the bubblewrap sandbox when the suite runs under coverage.

``make coverage`` measures every Python child through coverage's ``patch = ["subprocess"]``:
the child finds ``COVERAGE_PROCESS_CONFIG`` in its environment and saves its data beside the
main process's. A sandboxed tool gets neither: its environment is reduced to an allow-list and
the data directory is not visible in its jail. So the scanner half of ``secret_scan`` and the
whole atheris harness would read 0 % although tests run them on every suite.

Under coverage only (never in a plain ``make test``), this plugin wraps
``Sandbox.command`` of this process so that the jail it builds also gets
``--bind DATA_DIR DATA_DIR`` (writable: the child saves its data file there) and
``--setenv COVERAGE_PROCESS_CONFIG ...``. Everything else about the sandbox stays as the
production code built it; the tools the tests start in this process (unit tests of the
workflow tools) are measured. Worker subprocesses build their own sandboxes and stay unmeasured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def _coverage_target() -> tuple[str, str] | None:
    """(data directory, serialized config) of the coverage measuring this process, if any."""
    config = os.environ.get("COVERAGE_PROCESS_CONFIG")
    if not config:
        return None
    try:
        import coverage
    except ImportError:
        return None
    cov = coverage.Coverage.current()
    if cov is None:
        return None
    data_file = cov.config.data_file
    return str(Path(os.path.abspath(data_file)).parent), config


def with_coverage(args: list[str], data_dir: str, config: str) -> list[str]:
    """``args`` (a bwrap command line from ``Sandbox.command``) with the coverage bind added.

    The bind goes before the first ``--remount-ro``: after it bwrap could not create the
    mount point on the read-only root.
    """
    extra = ["--bind", data_dir, data_dir, "--setenv", "COVERAGE_PROCESS_CONFIG", config]
    at = args.index("--remount-ro")
    return [*args[:at], *extra, *args[at:]]


def pytest_configure(config: pytest.Config) -> None:
    target = _coverage_target()
    if target is None:
        return
    from forgespace.sandbox import Sandbox

    original = Sandbox.command

    def command(self: Sandbox, argv: Sequence[str], **kwargs: Any) -> list[str]:
        return with_coverage(original(self, argv, **kwargs), *target)

    Sandbox.command = command  # type: ignore[method-assign]
