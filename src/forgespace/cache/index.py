"""The cache index: entries, leases and counters in SQLite, shared by every process.

The filesystem is the truth; the index is a fast summary of it (bytes recorded at publish, last
access recorded by get_target, never by file atimes) so that gc and ``cache status`` never walk
workspace files. A deleted, corrupt or foreign-version index is rebuilt from disk with a logged
warning.

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
import errno
import fcntl
import functools
import logging
import os
import socket
import sqlite3
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from forgespace.errors import LockTimeoutError
from forgespace.layout import ID_PATTERN, META_DIRNAME, RESERVED_IDS, CacheLayout

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("shared", "cow-shared", "run")
# How long a statement waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 30.0
# How long opening the index waits for another process that is creating or rebuilding it.
REBUILD_LOCK_TIMEOUT_S = 600.0
REBUILD_HOLDER = "index-rebuild"
WAL_AUTOCHECKPOINT_PAGES = 10000

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
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease_pins (
    key TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    PRIMARY KEY (key, lease_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lease_pins_lease ON lease_pins (lease_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

_UPSERT_ENTRY = "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)"
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
class LeaseRecord:
    """A run's claim on the entries it uses (``pins`` are entry keys).

    The index stores ``expires = created + lease_ttl`` whatever ``expires`` the record carries,
    so every process agrees on one TTL; renew a lease by adding it again with a new ``created``.
    """

    lease_id: str
    target_id: str
    run_id: str | None
    pins: tuple[str, ...]
    holder: str
    created: float
    expires: float


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


def _recovering(method: _F) -> _F:
    """Run an index method; if the database turns out to be damaged under an open connection
    (overwritten in place, truncated...), rebuild it from disk and run the method once more.
    A failed transaction was rolled back, so running it again cannot count anything twice."""

    @functools.wraps(method)
    def wrapper(self: CacheIndex, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            # Exactly DatabaseError: SQLITE_CORRUPT / SQLITE_NOTADB. Its subclasses (locked,
            # busy, constraint, misuse) are not damage and propagate.
            if type(exc) is not sqlite3.DatabaseError:
                raise
            self._recover(exc)
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _Local(threading.local):
    conn: sqlite3.Connection | None = None
    pid: int = -1
    ino: tuple[int, int] | None = None


class CacheIndex:
    """Entries, leases and counters of one CACHE_DIR (see the module docstring)."""

    def __init__(self, layout: CacheLayout, *, lease_ttl: float) -> None:
        """Open (creating if needed) the index; rebuild it from disk if deleted or corrupt."""
        self.layout = layout
        self.path = layout.index_path
        self.lease_ttl = float(lease_ttl)
        self._local = _Local()
        self._open_lock = threading.Lock()
        layout.meta_dir.mkdir(parents=True, exist_ok=True)
        self._conn()

    # --- connections ---------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        loc = self._local
        pid = os.getpid()
        if loc.conn is not None and loc.pid != pid:
            _FORK_INHERITED.append(loc.conn)
            loc.conn = None
        try:
            st = os.stat(self.path)
            ino: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ino = None
        if loc.conn is not None and ino is not None and ino == loc.ino:
            return loc.conn
        # First use in this thread/process, or the file was deleted or replaced under us.
        if loc.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                loc.conn.close()
            loc.conn = None
        conn, ino = self._open_valid()
        loc.conn, loc.pid, loc.ino = conn, pid, ino
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _try_open(self) -> tuple[sqlite3.Connection, tuple[int, int]] | None:
        """A ready connection, or None if the index is missing, empty, corrupt or foreign."""
        if not self.path.exists():
            return None
        conn = self._connect()
        try:
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
        except (sqlite3.DatabaseError, OSError):
            conn.close()
            return None
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
        lock_path = self.layout.meta_dir / "index.lock"
        from forgespace.cache import fsops  # O_NOFOLLOW, regular single-link file

        fd = fsops.open_lock(self.layout.root, lock_path)
        try:
            deadline = time.monotonic() + REBUILD_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise LockTimeoutError(
                            f"timed out after {REBUILD_LOCK_TIMEOUT_S:.0f}s waiting for another "
                            f"process to create or rebuild the cache index {self.path}",
                            lock_path=str(lock_path),
                            holder="another process rebuilding the index",
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _create_or_rebuild(self) -> None:
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
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._busy_error(exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _busy_error(self, exc: sqlite3.OperationalError) -> Exception:
        if "locked" in str(exc) or "busy" in str(exc):
            return LockTimeoutError(
                f"timed out after {BUSY_TIMEOUT_S:.0f}s waiting for the cache index "
                f"{self.path} (another process holds its write lock)",
                lock_path=str(self.path),
                holder="another forgespace process writing the index",
            )
        return exc

    def _recover(self, exc: BaseException) -> None:
        """Drop this thread's connection and rebuild a damaged index (unless another process
        already did)."""
        log.warning(
            "cache index %s failed (%s); checking it and rebuilding if damaged", self.path, exc
        )
        loc = self._local
        if loc.conn is not None and loc.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                loc.conn.close()
        loc.conn, loc.ino = None, None
        with self._open_lock, self._rebuild_flock():
            got = self._try_open()
            if got is not None and _healthy(got[0]):
                got[0].close()
                return
            if got is not None:
                got[0].close()
            self._create_or_rebuild()

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        loc = self._local
        if loc.conn is not None and loc.pid == os.getpid():
            loc.conn.close()
        loc.conn = None

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
        """The hit path's one transaction: last_access = now, add ``lease``, count hit/miss."""
        now = time.time()
        with self._write() as c:
            c.execute("UPDATE entries SET last_access = ? WHERE key = ?", (now, key))
            if lease is not None:
                _insert_lease(c, lease, self.lease_ttl)
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
        )

    @_recovering
    def add_lease(self, lease: LeaseRecord) -> None:
        """Add or renew (same lease_id) a lease."""
        with self._write() as c:
            _insert_lease(c, lease, self.lease_ttl)

    @_recovering
    def end_lease(self, lease_id: str) -> bool:
        """End a lease; False if there was none with that id."""
        with self._write() as c:
            c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (lease_id,))
            return c.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,)).rowcount > 0

    @_recovering
    def end_any_lease(self, entry_key: str) -> bool:
        """End the oldest live lease pinning ``entry_key`` (else the oldest expired one)."""
        now = time.time()
        with self._write() as c:
            row = c.execute(
                "SELECT l.lease_id FROM lease_pins p JOIN leases l ON l.lease_id = p.lease_id "
                "WHERE p.key = ? ORDER BY (l.expires <= ?), l.created, l.lease_id LIMIT 1",
                (entry_key, now),
            ).fetchone()
            if row is None:
                return False
            c.execute("DELETE FROM lease_pins WHERE lease_id = ?", (row[0],))
            c.execute("DELETE FROM leases WHERE lease_id = ?", (row[0],))
            return True

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
        found again keep their recorded last access.
        """
        found = scan_entries(self.layout)
        with self._write() as c:
            old = {
                r[0]: (r[1], r[2])
                for r in c.execute("SELECT key, created, last_access FROM entries").fetchall()
            }
            c.execute("DELETE FROM entries")
            for e in found:
                row = list(_entry_row(e))
                if e.key in old:
                    row[7], row[8] = old[e.key]
                c.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?)", row)
        return len(found)


# --- helpers -------------------------------------------------------------------------------
def _healthy(conn: sqlite3.Connection) -> bool:
    try:
        return conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        return False


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


def _insert_lease(c: sqlite3.Connection, lease: LeaseRecord, lease_ttl: float) -> None:
    c.execute(
        "INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?,?,?)",
        (
            lease.lease_id,
            lease.target_id,
            lease.run_id,
            "\n".join(lease.pins),
            lease.holder,
            float(lease.created),
            float(lease.created) + lease_ttl,
        ),
    )
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


def _is_id(name: str) -> bool:
    return bool(ID_PATTERN.match(name)) and name not in RESERVED_IDS


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under ``path`` (or of ``path`` itself); no symlinks
    followed. Only a rebuild walks workspaces like this."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    if stat_mod.S_ISREG(st.st_mode):
        return st.st_size, 1
    if not stat_mod.S_ISDIR(st.st_mode):
        return 0, 0
    total = files = 0
    stack = [os.fspath(path)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for de in it:
                try:
                    if de.is_dir(follow_symlinks=False):
                        stack.append(de.path)
                    elif de.is_file(follow_symlinks=False):
                        total += de.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    return total, files


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
        if top.name == META_DIRNAME or not _is_id(top.name):
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
            elif _is_id(name):
                if not is_dir:
                    continue
                cow = has_cow_shared
                if with_sizes and not cow:
                    # An isolated run keeps its download beside its workspace; a copy-on-write
                    # run whose shared copy was evicted only has its own copy.
                    inner = set(os.listdir(child.path))
                    cow = "workspace" in inner and "target" not in inner
                key, kind, run_id = f"{tid}/{name}", "run", name
                mode = "copy-on-write" if cow else "isolated"
                parts = [Path(child.path)]
            else:
                continue
            nbytes = nfiles = 0
            created = now
            if with_sizes:
                for part in parts:
                    b, f = tree_size(part)
                    nbytes += b
                    nfiles += f
                with contextlib.suppress(ValueError):
                    created = min(os.lstat(x).st_mtime for x in parts if os.path.lexists(x))
            found.append(EntryRecord(key, tid, kind, run_id, mode, nbytes, nfiles, created, now))
    return found
