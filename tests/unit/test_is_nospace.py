"""errors.is_nospace: the one test for "disk or quota full" that every layer uses."""

from __future__ import annotations

import errno

from forgespace.errors import CacheFullError, StorageError, is_nospace


def test_full_disk_and_full_quota_are_nospace() -> None:
    assert is_nospace(OSError(errno.ENOSPC, "No space left on device"))
    assert is_nospace(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_nospace(CacheFullError(errno.ENOSPC, "full"))


def test_other_errors_are_not_nospace() -> None:
    assert not is_nospace(OSError(errno.EIO, "I/O error"))
    assert not is_nospace(PermissionError(errno.EACCES, "denied"))
    assert not is_nospace(ValueError("no errno"))


def test_wrapped_nospace_is_found_only_when_the_chain_is_asked_for() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise StorageError("write failed") from inner
    except StorageError as outer:
        wrapped = outer
    assert not is_nospace(wrapped)
    assert is_nospace(wrapped, chain=True)


def test_a_cycle_in_the_chain_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_nospace(a, chain=True)
