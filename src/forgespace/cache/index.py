# Over 500 lines on purpose, for now: one SQLite schema with its open/rebuild/degraded-read paths
# reads best in one place; splitting the rebuild scan into its own module is the next step.
"""The cache index: entries, leases and counters in SQLite, shared by every process.

The filesystem is the truth; the index is a fast summary of it (bytes recorded at publish, last
access recorded by get_target, never by file atimes) so that gc and ``cache status`` never walk
workspace files. A deleted, corrupt or foreign-version index is rebuilt from disk with a logged
warning.

Damage is not the same as a failing write: only SQLITE_CORRUPT / SQLITE_NOTADB (or a failing
``PRAGMA quick_check``) and a file that is not our schema move the index aside. A full disk
(SQLITE_FULL, an I/O error with no space left), a read-only filesystem or a permission error
raise CacheFullError / CacheAccessError and never touch the file. Reads still work then: when
the index cannot be opened normally (WAL mode needs to write its ``-shm`` file), it is read
through an ``immutable`` read-only connection, with one warning per process. Writes a caller
can do without (the hit path's access record, gc's bookkeeping) go through ``try_write``, which
skips them on a full disk with one warning per process; gc reconciles the index with the disk
later ("the filesystem is the truth").

Concurrency: SQLite in WAL mode (readers never block writers), ``synchronous=NORMAL`` (a commit
does not fsync; a power cut may lose the last transactions, which a rebuild or the next publish
repairs), a bounded ``busy_timeout``. One connection per thread and per process: a connection is
never used across ``fork`` (SQLite forbids it), the child opens its own.

Entry keys are paths relative to CACHE_DIR:

* ``{tid}/workspace`` -- shared mode (covers ``{tid}/target`` too), kind ``shared``
* ``{tid}/shared``    -- the copy-on-write shared copy, kind ``cow-shared``
* ``{tid}/{rid}``     -- a run directory (isolated or copy-on-write), kind ``run``
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import socket
import sqlite3
import stat as stat_mod
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from forgespace.cache.locks import flock
from forgespace.errors import (
    CacheAccessError,
    CacheFullError,
    ForgespaceError,
    LockTimeoutError,
    UnsafeCacheEntryError,
    is_nospace,
)
from forgespace.layout import META_DIRNAME, RUN_MODE_FILE, CacheLayout, is_valid_id
from forgespace.storage.pack import tree_usage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Version 1 lacked the lease owner columns; it is migrated in place (leases kept).
_MIGRATE_FROM_1 = (
    "ALTER TABLE leases ADD COLUMN attempt TEXT",
    "ALTER TABLE leases ADD COLUMN workflow_id TEXT",
    "ALTER TABLE leases ADD COLUMN workflow_run_id TEXT",
)
KINDS = ("shared", "cow-shared", "run")
# How long a statement waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 30.0
# How long opening the index waits for another process that is creating or rebuilding it.
REBUILD_LOCK_TIMEOUT_S = 600.0
REBUILD_HOLDER = "index-rebuild"
WAL_AUTOCHECKPOINT_PAGES = 10000
# A read-only fallback connection is reused for this long before the normal open is tried again
# (space may have been freed); writes always try the normal open first.
DEGRADED_RETRY_S = 1.0
# An I/O error with less free space than this is taken for a full disk (SQLite reports some
# ENOSPC cases, e.g. growing the -shm file, as SQLITE_IOERR_*, not SQLITE_FULL).
NEARLY_FULL_BYTES = 1 << 20
# Result codes that mean the file is damaged or not a database: only these move it aside.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    target_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    run_id TEXT,
    mode TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    files INTEGER NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_target ON entries (target_id);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    target_id TEXT NOT NULL,
    run_id TEXT,
    pins TEXT NOT NULL,
    holder TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    attempt TEXT,
    workflow_id TEXT,
    workflow_run_id TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease_pins (
    key TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    PRIMARY KEY (key, lease_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lease_pins_lease ON lease_pins (lease_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

_BUMP_COUNTER = "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = " + (
    "value + excluded.value"
)

# Connections inherited across fork must never be used or closed by the child (closing could
# disturb the parent's locks); they are parked here for the life of the child process.
_FORK_INHERITED: list[sqlite3.Connection] = []


@dataclass(frozen=True)
class EntryRecord:
    """One cache entry as the index knows it."""

    key: str
    target_id: str
    kind: str  # "shared" | "cow-shared" | "run"
    run_id: str | None
    mode: str  # "isolated" | "shared" | "copy-on-write"
    bytes: int
    files: int
    created: float
    last_access: float


@dataclass(frozen=True)
class LeaseOwner:
    """Who takes a lease: one attempt of one call, and the Temporal workflow it serves.

    ``attempt`` identifies the call that took the lease (a Temporal activity attempt, or one
    library call): ending or releasing "by attempt" touches a lease only while that attempt
    still owns it, so a stale attempt returning late never ends its retry's lease.
    ``workflow_id``/``workflow_run_id`` (Temporal runs) let the worker's sweep ask Temporal
    whether the run is still open, heartbeats renew the workflow's leases, and a shared
    cleanup without a run id end the leases of its own workflow only.
    """

    attempt: str
    workflow_id: str | None = None
    workflow_run_id: str | None = None

    @classmethod
    def fresh(cls) -> LeaseOwner:
        """An owner for one library call (``host:pid:random``)."""
        return cls(f"{default_holder()}:{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class LeaseRecord:
    """A run's claim on the entries it uses (``pins`` are entry keys).

    ``created`` is when the lease was taken or last renewed: the index stores
    ``expires = created + lease_ttl`` whatever ``expires`` the record carries, so every process
    agrees on one TTL; ``CacheIndex.renew`` (or adding the record again with a new
    ``created``) renews it. ``attempt`` / ``workflow_*`` record its owner (``LeaseOwner``).
    """

    lease_id: str
    target_id: str
    run_id: str | None
    pins: tuple[str, ...]
    holder: str
    created: float
    expires: float
    attempt: str | None = None
    workflow_id: str | None = None
    workflow_run_id: str | None = None

    @property
    def owner(self) -> LeaseOwner | None:
        """The owner recorded with the lease (None for leases of older versions)."""
        if self.attempt is None:
            return None
        return LeaseOwner(self.attempt, self.workflow_id, self.workflow_run_id)


@dataclass(frozen=True)
class CacheSummary:
    """Aggregates of the whole index (``CacheIndex.summary``)."""

    entries: int
    bytes: int
    targets: int
    oldest_access: float | None
    entries_by_kind: dict[str, int]
    live_leases: int


def default_holder() -> str:
    """``host:pid`` of this process, recorded in leases so operators know who holds what."""
    return f"{socket.gethostname()}:{os.getpid()}"


_F = TypeVar("_F", bound=Callable[..., Any])


def _is_damage(exc: BaseException) -> bool:
    """Whether an sqlite3 error says the database file itself is damaged (or not a database),
    as opposed to the environment failing (full disk, read-only, permissions, busy)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # No result code: exactly DatabaseError is how the module reports corruption.
        return type(exc) is sqlite3.DatabaseError
    return code & 0xFF in _DAMAGE_CODES


def _recovering(method: _F) -> _F:
    """Run an index method; if the database turns out to be damaged under an open connection
    (overwritten in place, truncated...), rebuild it from disk and run the method once more.
    A failed transaction was rolled back, so running it again cannot count anything twice.
    Failures that are not damage (full disk, read-only, permissions) become CacheFullError /
    CacheAccessError and never rebuild anything."""

    @functools.wraps(method)
    def wrapper(self: CacheIndex, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if not _is_damage(exc):
                mapped = self._env_error(exc, "use")
                if mapped is exc:
                    raise
                raise mapped from exc
            if self._local.degraded is not None:
                # The read-only fallback reads without locks: a write by another process can
                # show as a torn page. Not damage: read once more through a fresh connection.
                self._drop_conn()
                return method(self, *args, **kwargs)
            self._recover(exc)
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# A full or read-only cache is reported once per process (pid: a forked child warns for itself),
# not once per hit.
_warned_pid = -1


def make_cache_dirs(layout: CacheLayout, dirs: Iterable[Path]) -> None:
    """Create the cache's internal directories (and CACHE_DIR) if missing; a read-only
    filesystem, a permission error or a CACHE_DIR that is not a directory raise a
    CacheAccessError naming the path."""
    from forgespace.cache import fsops  # one name at a time, never through a planted link

    root = layout.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            try:
                os.close(fsops.open_dir(root, fsops.parts_under(root, d), create=True))
            except UnsafeCacheEntryError as exc:
                if d == layout.meta_dir:
                    raise  # everything internal lives below it: nothing can work around it
                # Refused, never followed; the operations that need it refuse too, and
                # `cache verify` reports it. Everything else keeps working.
                log.warning("%s", exc)
    except OSError as exc:
        if os.path.exists(root) and not os.path.isdir(root):
            raise CacheAccessError(
                errno.ENOTDIR, f"CACHE_DIR {root} is not a directory (it must be one)"
            ) from exc
        raise CacheAccessError.from_os_error(exc, "create the cache directory") from exc


class _Local(threading.local):
    conn: sqlite3.Connection | None = None
    pid: int = -1
    ino: tuple[int, int] | None = None
    # Set when ``conn`` is the read-only fallback: why the normal open failed, and until when
    # to keep using the fallback for reads.
    degraded: Exception | None = None
    degraded_until: float = 0.0


class CacheIndex:
    """Entries, leases and counters of one CACHE_DIR (see the module docstring)."""

    def __init__(self, layout: CacheLayout, *, lease_ttl: float, create: bool = True) -> None:
        """Open (creating if needed) the index; rebuild it from disk if deleted or corrupt.

        With ``create=False`` (read-only commands) CACHE_DIR and ``.forgespace`` are never
        created: a missing ``.forgespace`` raises CacheAccessError (ENOENT); callers check
        first. On a full or read-only cache the index is opened read-only (see the module
        docstring)."""
        self.layout = layout
        self.path = layout.index_path
        self.lease_ttl = float(lease_ttl)
        self._local = _Local()
        self._open_lock = threading.Lock()
        if create:
            make_cache_dirs(layout, [layout.meta_dir])
        elif not layout.meta_dir.is_dir():
            raise CacheAccessError(
                errno.ENOENT, f"no cache index: {layout.meta_dir} does not exist"
            )
        self._conn()

    # --- connections ---------------------------------------------------------------------
    def _conn(self, *, write: bool = False) -> sqlite3.Connection:
        loc = self._local
        pid = os.getpid()
        if loc.conn is not None and loc.pid != pid:
            _FORK_INHERITED.append(loc.conn)
            loc.conn, loc.degraded = None, None
        try:
            st = os.stat(self.path)
            ino: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ino = None
        if loc.conn is not None and ino is not None and ino == loc.ino:
            if loc.degraded is None:
                return loc.conn
            if not write and time.monotonic() < loc.degraded_until:
                return loc.conn
            # A read-only fallback: try the normal open again (space may have been freed).
        # First use in this thread/process, or the file was deleted or replaced under us.
        self._drop_conn()
        try:
            conn, ino = self._open_valid()
        except (CacheFullError, CacheAccessError) as exc:
            if write:
                raise
            conn, ino = self._open_read_only(exc)
            loc.degraded, loc.degraded_until = exc, time.monotonic() + DEGRADED_RETRY_S
        loc.conn, loc.pid, loc.ino = conn, pid, ino
        return conn

    def _drop_conn(self) -> None:
        """Close this thread's connection (never one inherited across fork)."""
        loc = self._local
        if loc.conn is not None and loc.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                loc.conn.close()
        loc.conn, loc.ino, loc.degraded = None, None, None

    def _open_read_only(self, why: Exception) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """A read-only connection that needs no -wal/-shm writes (``immutable``), for reading
        the index on a full or read-only filesystem. Raises ``why`` if that fails too.

        It does not see changes still in another process's WAL (a normal close checkpoints
        them into the file): reads may lag a little, which is acceptable for status, ls and
        gc's plan; every deletion is still re-checked under the target's lock."""
        global _warned_pid
        uri = "file:" + urllib.parse.quote(os.fspath(self.path)) + "?immutable=1"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            try:
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                if row is None or row[0] != SCHEMA_VERSION:
                    raise why
                st = os.stat(self.path)
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError):
            raise why from None
        if _warned_pid != os.getpid():
            _warned_pid = os.getpid()
            then = (
                " and skipping index writes that can wait (hits, gc records) without another "
                "warning while this lasts"
                if isinstance(why, CacheFullError)
                else ""
            )
            log.warning("%s; reading the cache index read-only%s", why, then)
        return conn, (st.st_dev, st.st_ino)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _drop_planted_files(self) -> None:
        """SQLite opens the index and its ``-wal``/``-shm`` by path, following symlinks: a
        link planted under one of those names would make it write outside CACHE_DIR. Before
        every connect, such a link (or any non-regular or hard-linked file) is removed — the
        link itself, never what it points to; a planted index is moved aside (rebuilt)."""
        for suffix in ("", "-wal", "-shm"):
            path = f"{self.path}{suffix}"
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError:
                return  # unreadable metadata: the open below reports it
            if stat_mod.S_ISREG(st.st_mode) and st.st_nlink == 1:
                continue
            log.warning(
                "cache index file %s is a %s, not a file forgespace made; removed it (the "
                "entry itself, never what it points to)",
                path,
                "symbolic link" if stat_mod.S_ISLNK(st.st_mode) else "planted entry",
            )
            with contextlib.suppress(OSError):  # read-only: no write can follow it either
                if suffix:
                    os.unlink(path)
                else:
                    os.replace(path, f"{self.path}.corrupt")

    def _try_open(self) -> tuple[sqlite3.Connection, tuple[int, int]] | None:
        """A ready connection, or None if the index is missing, empty, corrupt or foreign.
        Raises CacheFullError / CacheAccessError / LockTimeoutError when the environment,
        not the file, is at fault (the caller must not rebuild then)."""
        self._drop_planted_files()
        if not self.path.exists():
            return None
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise self._env_error(exc, "open") from exc
        try:
            known = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if known is None:  # empty, or some other database: not ours
                conn.close()
                return None
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is not None and row[0] == 1:
                _migrate_from_1(conn)
                row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                conn.close()
                return None
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.close()
                return None
            conn.execute("PRAGMA synchronous = NORMAL")
            # A checkpoint runs inside whichever commit crosses the threshold: with SQLite's
            # default (1000 pages) that is every ~250th hit and it makes the hit path's p99
            # ~2 ms; at 10000 pages (a WAL of ~40 MB at most) p99 stays ~0.15 ms. gc also
            # checkpoints (passively) after each sweep.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            # Remember which file this connection opened: a later stat showing another inode
            # means the index was deleted or replaced, and the connection must be reopened.
            st = os.stat(self.path)
        except sqlite3.Error as exc:
            conn.close()
            if _is_damage(exc):
                return None
            raise self._env_error(exc, "open") from exc
        except FileNotFoundError:
            conn.close()
            return None  # deleted meanwhile: recreate it
        except OSError as exc:
            conn.close()
            raise CacheAccessError.from_os_error(exc, "open the cache index") from exc
        return conn, (st.st_dev, st.st_ino)

    def _open_valid(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        got = self._try_open()
        if got is not None:
            return got
        # Slow path: create or rebuild under a process-wide and a cross-process lock, so one
        # process does it while the others wait and then open the result.
        with self._open_lock, self._rebuild_flock():
            got = self._try_open()
            if got is not None:
                return got
            self._create_or_rebuild()
            got = self._try_open()
            if got is None:
                raise RuntimeError(f"cache index {self.path} unusable right after creating it")
            return got

    @contextlib.contextmanager
    def _rebuild_flock(self) -> Iterator[None]:
        # locks.flock: reached without following symlinks, a bounded wait naming the holder
        lock_path = self.layout.meta_dir / "index.lock"
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(
                    flock(
                        lock_path,
                        timeout=REBUILD_LOCK_TIMEOUT_S,
                        what=f"the cache index {self.path} (another process is creating or "
                        "rebuilding it)",
                        purpose="create or rebuild the cache index",
                        root=self.layout.root,
                    )
                )
            except OSError as exc:
                if isinstance(exc, ForgespaceError):
                    raise  # a planted entry or the timeout: already says what and where
                raise self._os_error(exc, "create or rebuild the cache index") from exc
            yield

    def _create_or_rebuild(self) -> None:
        try:
            self._create_or_rebuild_now()
        except sqlite3.Error as exc:
            if _is_damage(exc):
                raise
            raise self._env_error(exc, "create") from exc
        except OSError as exc:
            if isinstance(exc, CacheFullError | CacheAccessError):
                raise
            raise self._os_error(exc, "create or rebuild the cache index") from exc

    def _create_or_rebuild_now(self) -> None:
        self._drop_planted_files()
        existed = self.path.exists() and self.path.stat().st_size > 0
        if existed:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.warning(
                "cache index %s is corrupt or of another schema version; moved to %s and "
                "rebuilding it from the cache directory",
                self.path,
                aside.name,
            )
            os.replace(self.path, aside)
        # A stale WAL of a deleted database would be replayed into the new one: remove it.
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.path) + suffix)
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size == 0:
                os.unlink(self.path)
        entries = scan_entries(self.layout)
        now = time.time()
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("DELETE FROM schema_version")
            for e in entries:
                conn.execute(
                    "INSERT OR IGNORE INTO entries VALUES (?,?,?,?,?,?,?,?,?)", _entry_row(e)
                )
            # We cannot know which runs are live: protect every run directory and shared
            # workspace found for one lease TTL (a conservative guess that frees itself).
            for lease in _rebuild_leases(entries, now, self.lease_ttl):
                _insert_lease(conn, lease, self.lease_ttl)
            conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        if entries:
            if not existed:
                log.warning(
                    "cache index %s was missing; rebuilt it from the cache directory: %d "
                    "entries, %d bytes (leases are unknown: every entry found is protected "
                    "for one lease TTL)",
                    self.path,
                    len(entries),
                    sum(e.bytes for e in entries),
                )
            else:
                log.warning(
                    "rebuilt cache index %s: %d entries, %d bytes",
                    self.path,
                    len(entries),
                    sum(e.bytes for e in entries),
                )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE: take the write lock up front)."""
        conn = self._conn(write=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._env_error(exc, "write") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and not _is_damage(exc):
                mapped = self._env_error(exc, "write")
                if mapped is not exc:
                    raise mapped from exc
            raise

    def _env_error(self, exc: sqlite3.Error, doing: str) -> Exception:
        """What a failure that is not damage means for the caller (``doing``: open, write,
        create, use): a LockTimeoutError (busy), a CacheFullError (no space), a
        CacheAccessError (read-only, permissions, I/O), or ``exc`` itself for anything else
        (a programming error)."""
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return LockTimeoutError(
                f"timed out after {BUSY_TIMEOUT_S:.0f}s waiting for the cache index "
                f"{self.path} (another process holds its write lock)",
                lock_path=str(self.path),
                holder="another forgespace process writing the index",
            )
        if primary == sqlite3.SQLITE_FULL or (
            primary == sqlite3.SQLITE_IOERR
            and _free_bytes(self.layout.meta_dir) < NEARLY_FULL_BYTES
        ):
            return CacheFullError(
                errno.ENOSPC,
                f"no space left on device in the cache {self.layout.root}: could not {doing} "
                f"the cache index {self.path} ({name}); the index is intact (free space, e.g. "
                "with `forgespace cache gc` or `cache evict`)",
            )
        if primary in (
            sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM,
            sqlite3.SQLITE_IOERR, sqlite3.SQLITE_AUTH,
        ):  # fmt: skip
            err, why = _access_problem(self.path)
            return CacheAccessError(
                err, f"cannot {doing} the cache index {self.path}: {why} ({name})"
            )
        return exc

    def _os_error(self, exc: OSError, doing: str) -> Exception:
        if is_nospace(exc):
            return CacheFullError(
                exc.errno,
                f"no space left on device in the cache {self.layout.root}: could not {doing} "
                f"({exc.filename}: {exc.strerror})",
            )
        return CacheAccessError.from_os_error(exc, doing)

    def try_write(self, what: str, write: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
        """Run the index write ``write(*args, **kwargs)``; when the cache filesystem is full,
        skip it (one warning per process) and return False. A read-only or not-our-user's
        cache still raises CacheAccessError: the command cannot do its job there.

        For writes the caller can do without: the hit path's access record and lease (the hit
        is served anyway), gc's and evict's records after a deletion (the next gc reconciles
        the index with the disk)."""
        global _warned_pid
        try:
            write(*args, **kwargs)
        except CacheFullError as exc:
            if _warned_pid != os.getpid():
                _warned_pid = os.getpid()
                log.warning(
                    "%s; skipped writing the cache index (%s) and will skip such writes "
                    "without another warning while this lasts",
                    exc,
                    what,
                )
            else:
                log.debug("skipped writing the cache index (%s): %s", what, exc)
            return False
        return True

    def _recover(self, exc: BaseException) -> None:
        """Drop this thread's connection and rebuild a damaged index (unless another process
        already did)."""
        log.warning(
            "cache index %s failed (%s); checking it and rebuilding if damaged", self.path, exc
        )
        self._drop_conn()
        with self._open_lock, self._rebuild_flock():
            got = self._try_open()  # raises (does not rebuild) if the environment is at fault
            if got is not None and _healthy(got[0]):
                got[0].close()
                return
            if got is not None:
                got[0].close()
            self._create_or_rebuild()

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        self._drop_conn()

    # --- entries --------------------------------------------------------------------------
    @_recovering
    def publish(self, entry: EntryRecord) -> None:
        """Insert or replace ``entry`` (called once its directory is in place)."""
        if entry.kind not in KINDS:
            raise ValueError(f"invalid entry kind {entry.kind!r}: expected one of {KINDS}")
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)", _entry_row(entry)
            )

    @_recovering
    def access(self, key: str, *, lease: LeaseRecord | None, hit: bool) -> None:
        """The hit path's one transaction: last_access = now, add ``lease`` (renewed: its TTL
        counts from now, not from the start of a long download; skipped when another attempt
        took it over meanwhile), count hit/miss."""
        now = time.time()
        with self._write() as c:
            c.execute("UPDATE entries SET last_access = ? WHERE key = ?", (now, key))
            if lease is not None:
                _insert_lease(
                    c, dataclasses.replace(lease, created=now), self.lease_ttl, if_owned=True
                )
            c.execute(
                _BUMP_COUNTER,
                ("hits" if hit else "misses", 1),
            )

    @_recovering
    def remove(self, key: str) -> None:
        """Forget an entry (its directory is gone or about to be)."""
        with self._write() as c:
            c.execute("DELETE FROM entries WHERE key = ?", (key,))

    @_recovering
    def get(self, key: str) -> EntryRecord | None:
        """The entry with ``key``, or None."""
        row = self._conn().execute("SELECT * FROM entries WHERE key = ?", (key,)).fetchone()
        return EntryRecord(*row) if row else None

    @_recovering
    def entries(self) -> list[EntryRecord]:
        """Every entry, least recently accessed first."""
        rows = self._conn().execute("SELECT * FROM entries ORDER BY last_access, key").fetchall()
        return [EntryRecord(*r) for r in rows]

    @_recovering
    def entries_of(self, target_id: str) -> list[EntryRecord]:
        """Every entry of one target."""
        rows = (
            self._conn()
            .execute("SELECT * FROM entries WHERE target_id = ? ORDER BY key", (target_id,))
            .fetchall()
        )
        return [EntryRecord(*r) for r in rows]

    @_recovering
    def total_bytes(self) -> int:
        """Sum of the bytes recorded for every entry."""
        return int(
            self._conn().execute("SELECT COALESCE(SUM(bytes), 0) FROM entries").fetchone()[0]
        )

    @_recovering
    def summary(self, now: float | None = None) -> CacheSummary:
        """Aggregates for ``cache status`` computed in SQL (no row per entry in Python):
        entries, bytes, targets, oldest_access, entries_by_kind, live_leases."""
        t = time.time() if now is None else now
        c = self._conn()
        n, total, targets, oldest = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COUNT(DISTINCT target_id), "
            "MIN(last_access) FROM entries"
        ).fetchone()
        kinds = dict.fromkeys(KINDS, 0)
        for kind, count in c.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind"):
            kinds[kind] = int(count)
        leases = c.execute("SELECT COUNT(*) FROM leases WHERE expires > ?", (t,)).fetchone()[0]
        return CacheSummary(
            int(n), int(total), int(targets), None if oldest is None else float(oldest), kinds,
            int(leases),
        )  # fmt: skip

    # --- leases ---------------------------------------------------------------------------
    def new_lease(
        self,
        lease_id: str,
        target_id: str,
        run_id: str | None,
        pins: tuple[str, ...],
        *,
        holder: str | None = None,
        now: float | None = None,
        owner: LeaseOwner | None = None,
    ) -> LeaseRecord:
        """A LeaseRecord created now that expires after this index's lease TTL."""
        created = time.time() if now is None else now
        return LeaseRecord(
            lease_id=lease_id,
            target_id=target_id,
            run_id=run_id,
            pins=tuple(pins),
            holder=holder or default_holder(),
            created=created,
            expires=created + self.lease_ttl,
            attempt=owner.attempt if owner else None,
            workflow_id=owner.workflow_id if owner else None,
            workflow_run_id=owner.workflow_run_id if owner else None,
        )

    @_recovering
    def add_lease(self, lease: LeaseRecord) -> None:
        """Add or renew (same lease_id) a lease."""
        with self._write() as c:
            _insert_lease(c, lease, self.lease_ttl)

    @_recovering
    def end_lease(self, lease_id: str, *, attempt: str | None = None) -> bool:
        """End a lease; False if there was none with that id. With ``attempt``, only while
        that attempt still owns it (a retry that took the lease over keeps it)."""
        with self._write() as c:
            if attempt is not None:
                row = c.execute(
                    "SELECT attempt FROM leases WHERE lease_id = ?", (lease_id,)
                ).fetchone()
                if row is None or row[0] != attempt:
                    return False
            c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (lease_id,))
            return c.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,)).rowcount > 0

    @_recovering
    def lease(self, lease_id: str) -> LeaseRecord | None:
        """The lease with ``lease_id`` (expired or not), or None."""
        row = (
            self._conn().execute("SELECT * FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        )
        return _lease_from_row(row) if row else None

    @_recovering
    def end_workflow_leases(self, entry_key: str, workflow_id: str) -> int:
        """End the leases pinning ``entry_key`` taken by workflow ``workflow_id``; how many."""
        with self._write() as c:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT l.lease_id FROM lease_pins p JOIN leases l ON l.lease_id = p.lease_id "
                    "WHERE p.key = ? AND l.workflow_id = ?",
                    (entry_key, workflow_id),
                )
            ]
            for lid in ids:
                c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (lid,))
                c.execute("DELETE FROM leases WHERE lease_id = ?", (lid,))
        return len(ids)

    @_recovering
    def renew(
        self,
        *,
        workflow_id: str | None = None,
        lease_id: str | None = None,
        now: float | None = None,
    ) -> int:
        """Renew leases (``created = now``, ``expires = now + lease TTL``): those of workflow
        ``workflow_id``, or the one with ``lease_id``. Returns how many were renewed."""
        if (workflow_id is None) == (lease_id is None):
            raise ValueError("renew: give exactly one of workflow_id and lease_id")
        t = time.time() if now is None else now
        column, value = ("workflow_id", workflow_id) if workflow_id else ("lease_id", lease_id)
        with self._write() as c:
            return int(
                c.execute(
                    f"UPDATE leases SET created = ?, expires = ? WHERE {column} = ?",
                    (t, t + self.lease_ttl, value),
                ).rowcount
            )

    @_recovering
    def live_leases(self, now: float | None = None) -> list[LeaseRecord]:
        """Unexpired leases, oldest first."""
        t = time.time() if now is None else now
        rows = (
            self._conn()
            .execute("SELECT * FROM leases WHERE expires > ? ORDER BY created, lease_id", (t,))
            .fetchall()
        )
        return [_lease_from_row(r) for r in rows]

    @_recovering
    def all_leases(self) -> list[LeaseRecord]:
        """Every lease, expired ones included, oldest first."""
        rows = self._conn().execute("SELECT * FROM leases ORDER BY created, lease_id").fetchall()
        return [_lease_from_row(r) for r in rows]

    @_recovering
    def leased_keys(self, now: float | None = None) -> set[str]:
        """Entry keys pinned by at least one unexpired lease."""
        t = time.time() if now is None else now
        rows = (
            self._conn()
            .execute(
                "SELECT DISTINCT p.key FROM lease_pins p JOIN leases l ON l.lease_id = p.lease_id "
                "WHERE l.expires > ?",
                (t,),
            )
            .fetchall()
        )
        return {r[0] for r in rows}

    @_recovering
    def is_leased(self, key: str, now: float | None = None) -> bool:
        """Whether an unexpired lease pins ``key`` (read fresh: use it inside the target lock)."""
        t = time.time() if now is None else now
        row = (
            self._conn()
            .execute(
                "SELECT 1 FROM lease_pins p JOIN leases l ON l.lease_id = p.lease_id "
                "WHERE p.key = ? AND l.expires > ? LIMIT 1",
                (key, t),
            )
            .fetchone()
        )
        return row is not None

    @_recovering
    def purge_expired_leases(self, now: float | None = None) -> list[LeaseRecord]:
        """Delete expired leases and return them."""
        t = time.time() if now is None else now
        with self._write() as c:
            rows = c.execute("SELECT * FROM leases WHERE expires <= ?", (t,)).fetchall()
            for r in rows:
                c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (r[0],))
                c.execute("DELETE FROM leases WHERE lease_id = ?", (r[0],))
        return [_lease_from_row(r) for r in rows]

    # --- counters -------------------------------------------------------------------------
    @_recovering
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (hits, misses, downloads, bytes_downloaded, ...)."""
        with self._write() as c:
            c.execute(_BUMP_COUNTER, (name, int(n)))

    @_recovering
    def counters(self) -> dict[str, int]:
        """Every counter by name."""
        rows = self._conn().execute("SELECT name, value FROM counters ORDER BY name").fetchall()
        return {name: int(value) for name, value in rows}

    # --- whole-index operations -----------------------------------------------------------
    def checkpoint(self) -> None:
        """Copy the WAL back into the database without waiting for anyone (PASSIVE)."""
        with contextlib.suppress(sqlite3.OperationalError):
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    @_recovering
    def rebuild(self) -> int:
        """Rebuild the index from disk now (``cache verify --repair``); returns entries found.

        Live leases and counters are kept; entries are replaced by what the disk holds. Entries
        found again keep their recorded last access. The walk runs outside the transaction
        (it may take long; gets must not wait for it): an entry published while it walked is
        newer than the walk, so its row is kept as its publisher wrote it.
        """
        started = time.time()
        found = scan_entries(self.layout)
        with self._write() as c:
            old = {
                r[0]: (r[1], r[2])
                for r in c.execute("SELECT key, created, last_access FROM entries").fetchall()
            }
            fresh = {k for k, (created, _) in old.items() if created >= started}
            c.execute("DELETE FROM entries WHERE created < ?", (started,))
            for e in found:
                if e.key in fresh:
                    continue  # published during the walk: its publisher's row is the truth
                row = list(_entry_row(e))
                if e.key in old:
                    row[7], row[8] = old[e.key]
                c.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?)", row)
        return len(found) + len(fresh - {e.key for e in found})


# --- helpers -------------------------------------------------------------------------------
def _healthy(conn: sqlite3.Connection) -> bool:
    """False only when ``PRAGMA quick_check`` finds damage; a check that cannot run for
    another reason (full disk, I/O, busy) raises instead of condemning the file."""
    try:
        return conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.Error as exc:
        if _is_damage(exc):
            return False
        raise


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return NEARLY_FULL_BYTES  # unknown: do not claim the disk is full
    return st.f_bavail * st.f_frsize


def _access_problem(path: Path) -> tuple[int, str]:
    """(errno, words) for why ``path`` (the index) cannot be opened or written."""
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return errno.EROFS, "the cache filesystem is mounted read-only"
    except OSError:
        pass
    for p in (path.parent, path):
        if os.path.exists(p) and not os.access(p, os.W_OK):
            return errno.EACCES, f"permission denied (uid {os.geteuid()} cannot write {p})"
    return errno.EIO, "I/O error"


def _entry_row(e: EntryRecord) -> tuple[object, ...]:
    return (
        e.key,
        e.target_id,
        e.kind,
        e.run_id,
        e.mode,
        int(e.bytes),
        int(e.files),
        float(e.created),
        float(e.last_access),
    )


def _migrate_from_1(conn: sqlite3.Connection) -> None:
    """Add the lease owner columns of version 2 (once, whichever process gets there first)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is not None and row[0] == 1:
            for stmt in _MIGRATE_FROM_1:
                conn.execute(stmt)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _insert_lease(
    c: sqlite3.Connection, lease: LeaseRecord, lease_ttl: float, *, if_owned: bool = False
) -> None:
    """Add or replace ``lease``. ``if_owned``: only if nobody holds it or its own attempt does
    (a late attempt finishing after its retry took the run over must not take it back)."""
    row = (
        lease.lease_id,
        lease.target_id,
        lease.run_id,
        "\n".join(lease.pins),
        lease.holder,
        float(lease.created),
        float(lease.created) + lease_ttl,
        lease.attempt,
        lease.workflow_id,
        lease.workflow_run_id,
    )
    insert = (
        "INSERT OR REPLACE INTO leases (lease_id, target_id, run_id, pins, holder, created, "
        "expires, attempt, workflow_id, workflow_run_id) "
    )
    if if_owned and lease.attempt is not None:
        done = c.execute(
            insert + "SELECT ?,?,?,?,?,?,?,?,?,? WHERE NOT EXISTS (SELECT 1 FROM leases "
            "WHERE lease_id = ? AND attempt IS NOT NULL AND attempt != ?)",
            (*row, lease.lease_id, lease.attempt),
        ).rowcount
        if not done:
            return
    else:
        c.execute(insert + "VALUES (?,?,?,?,?,?,?,?,?,?)", row)
    c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (lease.lease_id,))
    c.executemany(
        "INSERT OR IGNORE INTO lease_pins VALUES (?, ?)", [(k, lease.lease_id) for k in lease.pins]
    )


def _lease_from_row(r: tuple[object, ...]) -> LeaseRecord:
    pins = str(r[3])
    return LeaseRecord(
        lease_id=str(r[0]),
        target_id=str(r[1]),
        run_id=None if r[2] is None else str(r[2]),
        pins=tuple(pins.split("\n")) if pins else (),
        holder=str(r[4]),
        created=float(r[5]),  # type: ignore[arg-type]
        expires=float(r[6]),  # type: ignore[arg-type]
        attempt=None if r[7] is None else str(r[7]),
        workflow_id=None if r[8] is None else str(r[8]),
        workflow_run_id=None if r[9] is None else str(r[9]),
    )


def _rebuild_leases(entries: list[EntryRecord], now: float, ttl: float) -> list[LeaseRecord]:
    cow_shared = {e.target_id for e in entries if e.kind == "cow-shared"}
    leases = []
    for e in entries:
        if e.kind == "run":
            pins = (e.key, f"{e.target_id}/shared") if e.target_id in cow_shared else (e.key,)
            lease_id = e.key
        elif e.kind == "shared":
            pins, lease_id = (e.key,), f"{e.key}#{REBUILD_HOLDER}"
        else:
            continue
        leases.append(
            LeaseRecord(lease_id, e.target_id, e.run_id, pins, REBUILD_HOLDER, now, now + ttl)
        )
    return leases


def read_run_mode(run_dir: Path) -> str | None:
    """The mode a run directory's mode file records, or None (absent, unreadable, unknown)."""
    try:
        fd = os.open(run_dir / RUN_MODE_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text if text in ("isolated", "copy-on-write") else None


def _run_mode_on_disk(run_dir: Path, has_cow_shared: bool, look_inside: bool) -> str:
    """The mode of a run directory: its mode file (written at publish); for directories of
    older versions, a guess from the shape (cheap listing: from the target's ``shared/``)."""
    recorded = read_run_mode(run_dir)
    if recorded is not None:
        return recorded
    cow = has_cow_shared
    if look_inside and not cow:
        # An isolated run keeps its download beside its workspace; a copy-on-write run
        # whose shared copy was evicted only has its own copy.
        inner = set(os.listdir(run_dir))
        cow = "workspace" in inner and "target" not in inner
    return "copy-on-write" if cow else "isolated"


def scan_entries(
    layout: CacheLayout, *, with_sizes: bool = True, only: str | None = None
) -> list[EntryRecord]:
    """Every entry the cache directory holds, found by its layout (skips ``.forgespace``).

    With ``with_sizes`` (rebuild, verify --repair) the bytes and files of each entry are walked
    and run modes and creation times are read. Without it only the top two directory levels
    are listed (gc's cheap reconciliation): sizes are 0, modes a guess, times now. ``only``
    restricts the scan to one target directory.
    """
    root = layout.root
    now = time.time()
    found: list[EntryRecord] = []
    try:
        tops = sorted(os.scandir(root), key=lambda d: d.name)
    except FileNotFoundError:
        return found
    for top in tops:
        if top.name == META_DIRNAME or not is_valid_id(top.name):
            continue
        if only is not None and top.name != only:
            continue
        if not top.is_dir(follow_symlinks=False):
            continue
        tid = top.name
        try:
            with os.scandir(top.path) as it:
                children = sorted(it, key=lambda d: d.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        names = {c.name for c in children}
        has_cow_shared = "shared" in names
        for child in children:
            name = child.name
            try:
                # d_type from the directory listing: no stat per child
                is_dir = child.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if name in ("workspace", "target"):
                if name == "target" and "workspace" in names:
                    continue  # counted with the workspace
                key, kind, run_id, mode = f"{tid}/workspace", "shared", None, "shared"
                parts = [layout.shared_workspace(tid), layout.shared_target(tid)]
            elif name == "shared":
                if not is_dir:
                    continue
                key, kind, run_id, mode = f"{tid}/shared", "cow-shared", None, "copy-on-write"
                parts = [Path(child.path)]
            elif is_valid_id(name):
                if not is_dir:
                    continue
                key, kind, run_id = f"{tid}/{name}", "run", name
                mode = _run_mode_on_disk(Path(child.path), has_cow_shared, with_sizes)
                parts = [Path(child.path)]
                # An overlay run's own bytes are its upper layer (the mount shows the shared
                # copy beneath, which tree_usage does not enter).
                from forgespace.cache.staging import run_overlay_base

                base = run_overlay_base(layout, tid, name) if with_sizes else None
                if base is not None and os.path.isdir(base / "upper"):
                    parts.append(base / "upper")
            else:
                continue
            nbytes = nfiles = 0
            created = now
            if with_sizes:
                for part in parts:
                    b, f = tree_usage(part, one_filesystem=True)
                    nbytes += b
                    nfiles += f
                if kind == "run":
                    # bookkeeping, not the run's content (publish does not count it either)
                    b, f = tree_usage(Path(child.path) / RUN_MODE_FILE, one_filesystem=True)
                    nbytes, nfiles = nbytes - b, nfiles - f
                with contextlib.suppress(ValueError):
                    created = min(os.lstat(x).st_mtime for x in parts if os.path.lexists(x))
            found.append(EntryRecord(key, tid, kind, run_id, mode, nbytes, nfiles, created, now))
    return found
