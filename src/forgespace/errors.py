"""The one exception tree of forgespace.

::

    ForgespaceError
     ├── ConfigError (ValueError)            an environment variable has a value we cannot use
     ├── InvalidIdError (ValueError)         a target_id / run_id outside the accepted form
     ├── InvalidModeError (ValueError)       a workspace_isolation that is not one of the three
     ├── TargetNotFoundError (FileNotFoundError)   the store has no object for the target
     ├── UnsafeArchiveError                  an archive that would write outside its workspace
     │    └── UnsafeMemberError              one member breaks a rule (.archive, .member, .reason)
     ├── IntegrityError                      a download whose size or sha256 does not match
     │    └── CorruptArchiveError            a corrupt or truncated archive (.archive, .member)
     ├── StorageError                        the store failed (after retries for transient faults)
     ├── LockTimeoutError (TimeoutError)     a bounded wait ran out; names what and who holds it
     ├── CleanupRefusedError (ValueError)    cleanup_cache was given a path it must not delete
     ├── CacheFullError (OSError)            no room on disk (ENOSPC) for a download/extraction,
     │                                       or for an index write that cannot be skipped
     ├── CacheAccessError (OSError)          CACHE_DIR cannot be read or written (read-only
     │                                       filesystem, permission denied, not a directory)
     ├── UnsafeCacheEntryError (OSError)     a symlink, non-directory or mount point planted where
     │                                       the cache expects its own directory or lock file
     ├── BackendUnavailableError             the configured copy-on-write backend cannot work here
     │    └── SandboxUnavailableError        FORGESPACE_SANDBOX=bwrap, and bwrap cannot work here
     ├── SandboxStartError                   bwrap could not set up a tool's sandbox
     ├── WorkflowMetadataError (ValueError)  a workflow package's metadata.yaml is invalid
     ├── WorkflowParameterError (ValueError) a run's parameters do not fit the workflow's schema
     └── MissingExtraError (ImportError)     a command needs an optional extra that is not installed

Stdlib mix-ins let callers catch what they already know (``FileNotFoundError``,
``ValueError``...) while ``except ForgespaceError`` catches everything of ours.
"""

from __future__ import annotations

import errno


class ForgespaceError(Exception):
    """Root of every error forgespace raises on purpose."""


class ConfigError(ForgespaceError, ValueError):
    """A configuration value (usually an environment variable) is invalid."""


class InvalidIdError(ForgespaceError, ValueError):
    """A target_id or run_id is not of the accepted form."""


class InvalidModeError(ForgespaceError, ValueError):
    """A workspace_isolation value is not one of the accepted modes."""


class TargetNotFoundError(ForgespaceError, FileNotFoundError):
    """The store holds no object for the requested target."""


class _ArchiveDetail(Exception):
    """What an archive error is about, as attributes (callers never parse the message, like
    tarfile's FilterError carrying ``.tarinfo``): ``archive`` (how the archive is named),
    ``member`` (the member at fault, None for the archive as a whole) and ``reason``."""

    def __init__(
        self, message: str = "", *, archive: str = "", member: str | None = None, reason: str = ""
    ) -> None:
        self.archive, self.member, self.reason = archive, member, reason or message
        if not message:
            where = f": member {member!r}" if member is not None else ""
            message = f"archive {archive}{where} {reason}"
        super().__init__(message)


class UnsafeArchiveError(_ArchiveDetail, ForgespaceError):
    """An archive member would escape its workspace, or the archive is otherwise unsafe."""


class UnsafeMemberError(UnsafeArchiveError):
    """One member of the archive breaks a safety rule (``member`` names it)."""


class IntegrityError(ForgespaceError):
    """Downloaded bytes do not match the size or digest the object carries."""


class CorruptArchiveError(_ArchiveDetail, IntegrityError):
    """The archive is corrupt or truncated (``member``: where it was noticed, if known)."""


class StorageError(ForgespaceError):
    """The object store failed; ``transient`` tells whether retrying may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class LockTimeoutError(ForgespaceError, TimeoutError):
    """A bounded wait for a lock ran out."""

    def __init__(self, message: str, *, lock_path: str = "", holder: str = "") -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.holder = holder


class CleanupRefusedError(ForgespaceError, ValueError):
    """cleanup_cache was asked to delete something that is not a run directory of its mode."""


class _PlainOSError(OSError):
    """An OSError whose str() is its message alone (not "[Errno 28] ..."): ours already say
    what failed and where."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror is not None else super().__str__()


class CacheFullError(ForgespaceError, _PlainOSError):
    """The cache filesystem ran out of space; the partial entry was removed (or, for an index
    write, nothing was changed)."""


#: The errnos that mean "the disk (or the user's quota) is full": both become CacheFullError.
NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_nospace(exc: BaseException, *, chain: bool = False) -> bool:
    """True when ``exc`` is an OSError for a full disk or quota (ENOSPC, EDQUOT).

    The one test every layer uses before raising CacheFullError. ``chain=True`` also looks
    down ``__cause__``/``__context__``, for errors that arrive wrapped (e.g. a
    StorageError raised from the write that filled the disk).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in NOSPACE_ERRNOS:
            return True
        if not chain:
            return False
        cur = cur.__cause__ or cur.__context__
    return False


class CacheAccessError(ForgespaceError, _PlainOSError):
    """The cache directory (or a file in it) cannot be read or written: a read-only filesystem,
    permission denied, a path component that is not a directory. The message names the
    operation and the path; ``errno`` and ``filename`` are those of the underlying error."""

    @classmethod
    def from_os_error(cls, exc: OSError, doing: str) -> CacheAccessError:
        """Wrap ``exc`` (raised while ``doing``, e.g. "create the cache directory")."""
        where = f" {exc.filename}" if exc.filename is not None else ""
        err = cls(exc.errno, f"cannot {doing}:{where}: {exc.strerror or exc}")
        err.filename = exc.filename
        return err


class UnsafeCacheEntryError(ForgespaceError, OSError):
    """Something other than what forgespace made sits where it expects one of its own entries
    (an internal directory, a lock file, a directory to delete): a symlink, a non-directory, a
    hard-linked lock file or a mount point. It is refused, never followed.

    ``path`` names the entry and ``found`` says what it is (e.g. "a symbolic link (to '/x')").
    An OSError too, so a sweep that skips entries it cannot remove skips this one and goes on.
    """

    def __init__(self, message: str, *, path: str = "", found: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.found = found

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(ForgespaceError):
    """The configured copy-on-write backend cannot be used on this host."""


class WorkflowMetadataError(ForgespaceError, ValueError):
    """A workflow package's metadata.yaml is missing fields or has invalid values."""


class SandboxUnavailableError(BackendUnavailableError):
    """FORGESPACE_SANDBOX=bwrap was asked for and bubblewrap cannot work on this host."""


class SandboxStartError(ForgespaceError):
    """bubblewrap could not set up a tool's sandbox; the tool never ran. ``reason`` says why."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class WorkflowParameterError(ForgespaceError, ValueError):
    """A run's parameters do not fit its workflow's metadata.yaml schema (or cannot be read)."""


class MissingExtraError(ForgespaceError, ImportError):
    """A command or tool needs an optional extra (``forgespace[temporal]``...) not installed.

    ``extra`` is the extra's name, ``modules`` the modules found missing."""

    def __init__(self, message: str, *, extra: str, modules: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.extra = extra
        self.modules = modules
