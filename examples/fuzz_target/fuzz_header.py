"""Fuzz entry point: atheris calls TestOneInput with each generated input."""

from __future__ import annotations

import contextlib

from header_parser import HeaderError, parse_header


def TestOneInput(data: bytes) -> None:
    # HeaderError is the parser's documented rejection of bad input; anything else is a bug.
    with contextlib.suppress(HeaderError):
        parse_header(data)
