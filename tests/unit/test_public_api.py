from __future__ import annotations

import forgespace
from forgespace import ForgespaceError, TargetNotFoundError, UnsafeArchiveError


def test_all_names_resolve():
    for name in forgespace.__all__:
        assert getattr(forgespace, name) is not None, name


def test_contract_names_are_public():
    for name in (
        "Settings",
        "WorkspaceCache",
        "open_store",
        "ForgespaceError",
        "TargetNotFoundError",
        "UnsafeArchiveError",
    ):
        assert name in forgespace.__all__


def test_error_tree_mixins():
    assert issubclass(TargetNotFoundError, ForgespaceError)
    assert issubclass(TargetNotFoundError, FileNotFoundError)
    assert issubclass(UnsafeArchiveError, ForgespaceError)
