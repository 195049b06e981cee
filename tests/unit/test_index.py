"""The cache index: entries, leases, counters, multi-process safety, rebuild from disk."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from forgespace.cache.index import (
    SCHEMA_VERSION,
    CacheIndex,
    EntryRecord,
    LeaseOwner,
    LeaseRecord,
    scan_entries,
)
from forgespace.layout import CacheLayout


def entry(key: str, *, last_access: float | None = None, nbytes: int = 10) -> EntryRecord:
    tid, rest = key.split("/", 1)
    now = time.time() if last_access is None else last_access
    if rest == "workspace":
        kind, run_id, mode = "shared", None, "shared"
    elif rest == "shared":
        kind, run_id, mode = "cow-shared", None, "copy-on-write"
    else:
        kind, run_id, mode = "run", rest, "isolated"
    return EntryRecord(key, tid, kind, run_id, mode, nbytes, 1, now, now)


@pytest.fixture
def layout(tmp_path: Path) -> CacheLayout:
    return CacheLayout(tmp_path / "cache")


@pytest.fixture
def index(layout: CacheLayout) -> CacheIndex:
    return CacheIndex(layout, lease_ttl=60)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_publish_get_and_entries_least_recent_first(index: CacheIndex) -> None:
    index.publish(entry("a/workspace", last_access=100.0))
    index.publish(entry("b/shared", last_access=50.0))
    index.publish(entry("c/r1", last_access=75.0))
    assert index.get("a/workspace") == entry("a/workspace", last_access=100.0)
    assert index.get("missing/workspace") is None
    assert [e.key for e in index.entries()] == ["b/shared", "c/r1", "a/workspace"]
    assert index.total_bytes() == 30
    index.publish(entry("a/workspace", last_access=100.0, nbytes=5))  # upsert
    assert index.total_bytes() == 25
    index.remove("b/shared")
    assert [e.key for e in index.entries()] == ["c/r1", "a/workspace"]


def test_publish_rejects_unknown_kind(index: CacheIndex) -> None:
    bad = EntryRecord("a/workspace", "a", "folder", None, "shared", 1, 1, 0.0, 0.0)
    with pytest.raises(ValueError, match="folder"):
        index.publish(bad)


def test_access_updates_last_access_adds_lease_and_counts(index: CacheIndex) -> None:
    index.publish(entry("a/workspace", last_access=1.0))
    lease = index.new_lease("a/workspace#r1", "a", "r1", ("a/workspace",))
    before = time.time()
    index.access("a/workspace", lease=lease, hit=True)
    index.access("a/workspace", lease=None, hit=False)
    got = index.get("a/workspace")
    assert got is not None and got.last_access >= before
    assert index.counters() == {"hits": 1, "misses": 1}
    assert [le.lease_id for le in index.live_leases()] == ["a/workspace#r1"]
    assert index.is_leased("a/workspace")


def test_lease_expiry_is_created_plus_ttl_and_renewal_extends_it(layout: CacheLayout) -> None:
    index = CacheIndex(layout, lease_ttl=10)
    old = LeaseRecord("t/r1", "t", "r1", ("t/r1",), "h:1", created=1000.0, expires=9e12)
    index.add_lease(old)
    (stored,) = index.all_leases()
    assert stored.expires == 1010.0  # the index's TTL wins over what the record carries
    assert index.live_leases(now=1009.0) == [stored]
    assert index.live_leases(now=1010.0) == []
    assert index.is_leased("t/r1", now=1009.0)
    assert not index.is_leased("t/r1", now=1011.0)
    index.add_lease(LeaseRecord("t/r1", "t", "r1", ("t/r1",), "h:1", 2000.0, 0.0))
    assert index.live_leases(now=2005.0)[0].expires == 2010.0
    assert len(index.all_leases()) == 1


def test_end_lease_by_attempt_only_while_that_attempt_owns_it(index: CacheIndex) -> None:
    from forgespace.cache.index import LeaseOwner

    key = "t/r1"
    index.add_lease(index.new_lease(key, "t", "r1", (key,), owner=LeaseOwner("a#1", "wf")))
    # a retry of the same run takes the lease over
    index.add_lease(index.new_lease(key, "t", "r1", (key,), owner=LeaseOwner("a#2", "wf")))
    assert not index.end_lease(key, attempt="a#1")
    assert index.is_leased(key)
    assert index.end_lease(key, attempt="a#2")
    assert not index.end_lease(key, attempt="a#2")
    assert not index.end_lease(key)


def test_end_workflow_leases_and_renew(index: CacheIndex) -> None:
    from forgespace.cache.index import LeaseOwner

    key = "t/workspace"
    now = time.time()
    for wf in ("wf-a", "wf-b"):
        owner = LeaseOwner(f"{wf}/1#1", wf)
        index.add_lease(index.new_lease(f"{key}#{wf}", "t", wf, (key,), owner=owner, now=now - 50))
    assert index.renew(workflow_id="wf-a", now=now) == 1
    by_id = {le.lease_id: le for le in index.all_leases()}
    # exactly the clock given (not the current time)
    assert by_id[f"{key}#wf-a"].expires == now + index.lease_ttl
    assert by_id[f"{key}#wf-b"].expires == now - 50 + index.lease_ttl
    assert index.end_workflow_leases(key, "wf-b") == 1
    assert index.end_workflow_leases(key, "wf-b") == 0
    assert [le.workflow_id for le in index.all_leases()] == ["wf-a"]
    # One lease by its id; asking for both, or for neither, is a caller's mistake.
    assert index.renew(lease_id=f"{key}#wf-a", now=now + 10) == 1
    assert index.all_leases()[0].expires == now + 10 + index.lease_ttl
    for both_or_neither in ({}, {"workflow_id": "wf-a", "lease_id": f"{key}#wf-a"}):
        with pytest.raises(
            ValueError, match=r"^renew: give exactly one of workflow_id and lease_id$"
        ):
            index.renew(**both_or_neither)  # type: ignore[arg-type]
    assert index.all_leases()[0].expires == pytest.approx(now + 10 + index.lease_ttl)


def test_lease_pins_several_entries(index: CacheIndex) -> None:
    index.add_lease(index.new_lease("t/r1", "t", "r1", ("t/r1", "t/shared")))
    assert index.leased_keys() == {"t/r1", "t/shared"}
    (lease,) = index.live_leases()
    assert lease.pins == ("t/r1", "t/shared")
    index.end_lease("t/r1")
    assert index.leased_keys() == set()


def test_purge_expired_leases(index: CacheIndex) -> None:
    now = time.time()
    index.add_lease(index.new_lease("t/r1", "t", "r1", ("t/r1",), now=now - 120))
    index.add_lease(index.new_lease("t/r2", "t", "r2", ("t/r2",), now=now))
    assert [le.lease_id for le in index.purge_expired_leases()] == ["t/r1"]
    assert [le.lease_id for le in index.all_leases()] == ["t/r2"]
    # its pins go with it: the index does not grow by a row per expired lease
    with contextlib.closing(sqlite3.connect(index.path)) as db:
        assert db.execute("SELECT lease_id, key FROM lease_pins").fetchall() == [("t/r2", "t/r2")]
    assert index.purge_expired_leases(now=now + 59) == []  # the clock given, not the time
    assert [le.lease_id for le in index.purge_expired_leases(now=now + 60)] == ["t/r2"]
    assert index.all_leases() == []


def test_counters_add(index: CacheIndex) -> None:
    index.count("downloads")
    index.count("bytes_downloaded", 1000)
    index.count("bytes_downloaded", 24)
    assert index.counters() == {"bytes_downloaded": 1024, "downloads": 1}


def test_threads_share_one_index_object(index: CacheIndex) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                index.publish(entry(f"t{n}/r{i}"))
                index.count("hits")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(index.entries()) == 200
    assert index.counters()["hits"] == 200


def _count_in_process(root: str, n: int) -> None:
    idx = CacheIndex(CacheLayout(Path(root)), lease_ttl=60)
    for i in range(n):
        idx.count("downloads")
        idx.access(
            "t/workspace",
            lease=idx.new_lease(f"t/workspace#{os.getpid()}-{i}", "t", None, ("t/workspace",)),
            hit=True,
        )


def test_many_processes_lose_no_update(layout: CacheLayout, index: CacheIndex) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_in_process, args=(str(layout.root), 100)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert index.counters() == {"downloads": 400, "hits": 400}
    assert len(index.live_leases()) == 400


def test_forked_child_opens_its_own_connection(layout: CacheLayout, index: CacheIndex) -> None:
    index.count("hits")  # the parent's connection exists before the fork
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: [index.count("hits") for _ in range(20)])
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    index.count("hits")
    assert index.counters()["hits"] == 22


def make_cache_on_disk(root: Path) -> None:
    # shared: workspace + target; copy-on-write: shared/ and one run; isolated: one run
    write_tree(
        root / "sh", {"target": b"x" * 100, "workspace/a.txt": b"a" * 10, "workspace/d/b": b"bb"}
    )
    write_tree(root / "cw", {"shared/target": b"t" * 50, "shared/workspace/f": b"ffff"})
    write_tree(root / "cw" / "run1", {"workspace/f": b"ffff", "workspace/g": b"g"})
    write_tree(root / "iso" / "run2", {"target": b"z" * 7, "workspace/h": b"hh"})
    write_tree(root / "single", {"target": b"s" * 3})  # shared, not an archive
    write_tree(root / ".forgespace" / "tmp" / "stage-1", {"junk": b"j" * 1000})
    (root / "not an id").mkdir()
    os.symlink(root / "sh", root / "link")  # symlinked dirs are not entries


def test_scan_finds_every_entry_by_layout(layout: CacheLayout) -> None:
    make_cache_on_disk(layout.root)
    got = {e.key: e for e in scan_entries(layout)}
    assert set(got) == {"sh/workspace", "cw/shared", "cw/run1", "iso/run2", "single/workspace"}
    assert (got["sh/workspace"].bytes, got["sh/workspace"].files) == (112, 3)
    assert (got["cw/shared"].kind, got["cw/shared"].bytes) == ("cow-shared", 54)
    assert (got["cw/run1"].kind, got["cw/run1"].mode, got["cw/run1"].bytes) == (
        "run",
        "copy-on-write",
        5,
    )
    assert (got["iso/run2"].mode, got["iso/run2"].run_id, got["iso/run2"].bytes) == (
        "isolated",
        "run2",
        9,
    )
    assert (got["single/workspace"].kind, got["single/workspace"].bytes) == ("shared", 3)


def test_fresh_cache_creates_index_without_warning(
    layout: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        CacheIndex(layout, lease_ttl=60)
    assert caplog.records == []
    assert layout.index_path.exists()


def test_deleted_index_is_rebuilt_from_disk_with_warning(
    layout: CacheLayout, index: CacheIndex, caplog: pytest.LogCaptureFixture
) -> None:
    make_cache_on_disk(layout.root)
    index.count("hits")
    for suffix in ("", "-wal", "-shm"):
        Path(str(layout.index_path) + suffix).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        keys = {e.key for e in index.entries()}  # same object: notices and reopens
    assert keys == {"sh/workspace", "cw/shared", "cw/run1", "iso/run2", "single/workspace"}
    assert any("missing" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    assert index.get("sh/workspace").bytes == 112  # type: ignore[union-attr]
    # Leases are unknown after a rebuild: run dirs and shared workspaces are protected.
    assert index.leased_keys() == {
        "cw/run1",
        "cw/shared",
        "iso/run2",
        "sh/workspace",
        "single/workspace",
    }
    # cleanup_cache's lease id convention still ends a run's protection
    assert index.end_lease("iso/run2")
    assert not index.is_leased("iso/run2")
    # other processes/objects see the rebuilt index too
    assert len(CacheIndex(layout, lease_ttl=60).entries()) == 5


def test_garbage_index_is_moved_aside_and_rebuilt(
    layout: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    make_cache_on_disk(layout.root)
    CacheIndex(layout, lease_ttl=60).close()
    layout.index_path.write_bytes(os.urandom(8192))
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        index = CacheIndex(layout, lease_ttl=60)
    assert len(index.entries()) == 5
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert (layout.meta_dir / "index.sqlite.corrupt").exists()


def test_garbage_written_under_an_open_index_is_noticed(
    layout: CacheLayout, index: CacheIndex
) -> None:
    make_cache_on_disk(layout.root)
    index.count("hits")
    # Replaced by a new file (e.g. restored from elsewhere): another inode, not a database.
    tmp = layout.meta_dir / "garbage"
    tmp.write_bytes(b"not a database at all" * 100)
    os.replace(tmp, layout.index_path)
    assert len(index.entries()) == 5


def test_rebuild_keeps_last_access_and_leases(layout: CacheLayout, index: CacheIndex) -> None:
    make_cache_on_disk(layout.root)
    index.rebuild()  # the index object already existed: a repair from disk
    index.publish(entry("gone/workspace"))  # not on disk: the repair drops it
    index.access(
        "sh/workspace",
        lease=index.new_lease("sh/workspace#r", "sh", "r", ("sh/workspace",)),
        hit=True,
    )
    seen = index.get("sh/workspace").last_access  # type: ignore[union-attr]
    assert index.rebuild() == 5
    assert index.get("gone/workspace") is None
    assert index.get("sh/workspace").last_access == seen  # type: ignore[union-attr]
    assert "sh/workspace#r" in {le.lease_id for le in index.live_leases()}


def test_rebuilt_leases_name_each_run_and_protect_for_one_lease_ttl(
    layout: CacheLayout, index: CacheIndex
) -> None:
    """A lost index is rebuilt with one lease per run directory (its id the run key, naming
    the run, the way release and the lease counts find a run's lease) and per shared
    workspace (no run), each for one lease TTL from the rebuild."""
    make_cache_on_disk(layout.root)
    for suffix in ("", "-wal", "-shm"):
        Path(str(layout.index_path) + suffix).unlink(missing_ok=True)
    before = time.time()
    got = {le.lease_id: le for le in index.all_leases()}
    after = time.time()
    assert {lid: (le.target_id, le.run_id, le.pins) for lid, le in got.items()} == {
        "cw/run1": ("cw", "run1", ("cw/run1", "cw/shared")),
        "iso/run2": ("iso", "run2", ("iso/run2",)),
        "sh/workspace#index-rebuild": ("sh", None, ("sh/workspace",)),
        "single/workspace#index-rebuild": ("single", None, ("single/workspace",)),
    }
    for le in got.values():
        assert le.holder == "index-rebuild" and le.owner is None
        assert before <= le.created <= after and le.expires == le.created + 60


def test_a_lease_reads_back_exactly_as_new_lease_made_it(index: CacheIndex) -> None:
    """Every field round-trips, the absent ones as None (not "None") and no pins as none."""
    full = index.new_lease(
        "t/r1", "t", "r1", ("t/r1", "t/shared"), holder="h:1", now=100.0,
        owner=LeaseOwner("a1", "wf", "wf-run"),
    )  # fmt: skip
    bare = index.new_lease("t/workspace#x", "t", None, (), holder="h:2", now=200.0)
    assert (full.created, full.expires) == (100.0, 160.0)  # the index's lease TTL is 60 s
    assert (bare.attempt, bare.workflow_id, bare.workflow_run_id) == (None, None, None)
    index.add_lease(full)
    index.add_lease(bare)
    assert index.lease("t/r1") == full
    assert index.lease("t/workspace#x") == bare
    assert index.all_leases() == [full, bare]
    part = index.new_lease("t/r2", "t", "r2", ("t/r2",), holder="h:3", now=300.0,
                           owner=LeaseOwner("a2", "wf"))  # fmt: skip
    index.add_lease(part)
    assert index.lease("t/r2") == part and part.workflow_run_id is None


def test_hit_path_is_one_short_transaction(index: CacheIndex) -> None:
    # A functional guard, not a benchmark: the hit path must not grow per-entry work.
    for i in range(500):
        index.publish(entry(f"t{i}/workspace"))
    calls = []
    conn = index._conn()
    conn.set_trace_callback(calls.append)
    index.access(
        "t1/workspace",
        lease=index.new_lease("t1/workspace#r", "t1", "r", ("t1/workspace",)),
        hit=True,
    )
    conn.set_trace_callback(None)
    assert calls[0] == "BEGIN IMMEDIATE" and calls[-1] == "COMMIT"
    assert len(calls) <= 7


def test_summary_aggregates_in_sql(index: CacheIndex) -> None:
    assert index.summary().entries == 0 and index.summary().oldest_access is None
    index.publish(entry("a/workspace", last_access=10.0, nbytes=5))
    index.publish(entry("a/r1", last_access=30.0, nbytes=7))
    index.publish(entry("b/shared", last_access=20.0, nbytes=11))
    index.add_lease(index.new_lease("a/r1", "a", "r1", ("a/r1",)))
    index.add_lease(index.new_lease("a/r0", "a", "r0", ("a/r0",), now=time.time() - 3600))
    s = index.summary()
    assert (s.entries, s.bytes, s.targets, s.oldest_access, s.live_leases) == (3, 23, 2, 10.0, 1)
    assert s.entries_by_kind == {"shared": 1, "cow-shared": 1, "run": 1}


def _garbage_in_place(layout: CacheLayout, index: CacheIndex) -> None:
    """Overwrite the index file's first 64 KiB in place (same inode) after checkpointing
    everything into it, so no WAL frame masks the damage."""
    index._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(layout.index_path, "r+b") as f:
        f.write(os.urandom(65536))


def test_garbage_written_in_place_under_an_open_connection(
    layout: CacheLayout, index: CacheIndex, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection that was open across the damage is the one that meets it: the call
    fails inside SQLite, the index is rebuilt from disk and the call runs once more."""
    make_cache_on_disk(layout.root)
    index.rebuild()
    index.count("hits")
    _garbage_in_place(layout, index)
    conn = index._conn()
    # What a long-lived worker's connection sees once its page cache no longer holds the
    # pages (memory pressure, a larger index): the damaged file itself.
    conn.execute("PRAGMA shrink_memory")
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        index.count("misses")
    want = {"sh/workspace", "cw/shared", "cw/run1", "iso/run2", "single/workspace"}
    assert {e.key for e in index.entries()} == want
    assert index.counters() == {"misses": 1}  # counted once, in the rebuilt index
    messages = [r.getMessage() for r in caplog.records]
    # Only the open-connection recovery (_recover) logs "failed (...); checking it".
    assert any("failed (file is not a database); checking it" in m for m in messages), messages
    assert any("corrupt" in m for m in messages)
    assert (layout.meta_dir / "index.sqlite.corrupt").exists()


def test_garbage_written_in_place_is_rebuilt_by_the_next_connection(
    layout: CacheLayout, index: CacheIndex, caplog: pytest.LogCaptureFixture
) -> None:
    make_cache_on_disk(layout.root)
    index.rebuild()
    index.count("hits")
    _garbage_in_place(layout, index)
    seen: list[set[str]] = []
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        # Another thread opens its own connection: it finds garbage and rebuilds...
        t = threading.Thread(target=lambda: seen.append({e.key for e in index.entries()}))
        t.start()
        t.join(60)
        # ...and this thread's connection notices the new file and moves over to it.
        index.count("misses")
    want = {"sh/workspace", "cw/shared", "cw/run1", "iso/run2", "single/workspace"}
    assert seen == [want] and {e.key for e in index.entries()} == want
    assert index.counters() == {"misses": 1}  # counters restart with the rebuilt index
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_sqlite_full_is_not_corruption(index: CacheIndex, layout: CacheLayout) -> None:
    """SQLITE_FULL (here from max_page_count, deterministically) raises CacheFullError; the
    index is not moved aside and keeps its leases and counters; try_write skips the write."""
    from forgespace.errors import CacheFullError

    index.add_lease(index.new_lease("t/r", "t", "r", ("t/r",)))
    index.count("downloads", 3)
    ino = os.stat(index.path).st_ino
    pages = index._conn().execute("PRAGMA page_count").fetchone()[0]
    index._conn().execute(f"PRAGMA max_page_count = {pages}")
    big = [entry(f"t{i}/workspace") for i in range(2000)]
    with pytest.raises(CacheFullError, match="no space left") as ei:
        for e in big:
            index.publish(e)
    assert isinstance(ei.value, OSError)
    assert index.try_write("test", index.publish, big[-1]) is False
    assert os.stat(index.path).st_ino == ino
    assert not list(layout.meta_dir.glob("index.sqlite.corrupt*"))
    assert [le.lease_id for le in index.live_leases()] == ["t/r"]
    assert index.counters()["downloads"] == 3


def test_real_damage_is_still_moved_aside(index: CacheIndex, layout: CacheLayout) -> None:
    index.close()
    layout.index_path.write_bytes(b"this is not an sqlite database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{layout.index_path}{suffix}").unlink(missing_ok=True)
    again = CacheIndex(layout, lease_ttl=3600)
    assert (layout.meta_dir / "index.sqlite.corrupt").exists()
    assert again.entries() == []


_HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the index's write lock, held until stdin closes
print("held", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_a_write_lock_held_past_the_busy_timeout_is_a_lock_timeout(
    layout: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the index's write lock: the write waits BUSY_TIMEOUT_S, then
    raises LockTimeoutError naming the index; the index is not taken for damaged."""
    import subprocess
    import sys

    from forgespace.cache import index as index_module
    from forgespace.errors import LockTimeoutError

    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_S", 0.2)
    idx = CacheIndex(layout, lease_ttl=60)
    idx.publish(entry("a/workspace"))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(layout.index_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LockTimeoutError, match="another process holds its write lock") as ei:
            idx.publish(entry("b/workspace"))
        assert str(layout.index_path) in str(ei.value)
        assert [e.key for e in idx.entries()] == ["a/workspace"]  # reads still work
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    idx.publish(entry("b/workspace"))  # the lock is free again: the same write succeeds
    assert {e.key for e in idx.entries()} == {"a/workspace", "b/workspace"}
    assert not list(layout.meta_dir.glob("index.sqlite.corrupt*"))


def test_an_index_of_another_schema_version_is_rebuilt(
    layout: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    make_cache_on_disk(layout.root)
    CacheIndex(layout, lease_ttl=60).close()
    with sqlite3.connect(layout.index_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
        conn.execute("DELETE FROM entries")
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.index"):
        index = CacheIndex(layout, lease_ttl=60)
    assert len(index.entries()) == 5  # rebuilt from the disk, not read from the foreign file
    assert any("of another schema version" in r.getMessage() for r in caplog.records)
    assert (layout.meta_dir / "index.sqlite.corrupt").exists()
    with sqlite3.connect(layout.index_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_an_index_of_schema_version_1_is_migrated_in_place(layout: CacheLayout) -> None:
    # Version 1 had no lease owner columns. An upgraded worker keeps its entries, its access
    # times and its live leases (a rebuild would lose who holds what), and reads old leases as
    # owner-less.
    import sqlite3

    from forgespace.cache.index import LeaseOwner

    index = CacheIndex(layout, lease_ttl=3600)
    index.publish(entry("a/workspace", last_access=1000.0, nbytes=42))
    index.add_lease(index.new_lease("a/workspace#r1", "a", "r1", ("a/workspace",)))
    index.close()
    with sqlite3.connect(layout.index_path) as conn:  # as version 1 wrote it
        for column in ("attempt", "workflow_id", "workflow_run_id"):
            conn.execute(f"ALTER TABLE leases DROP COLUMN {column}")
        conn.execute("UPDATE schema_version SET version = 1")
    migrated = CacheIndex(layout, lease_ttl=3600)
    got = migrated.get("a/workspace")
    assert got is not None and (got.bytes, got.last_access) == (42, 1000.0)
    lease = migrated.lease("a/workspace#r1")
    assert lease is not None and lease.owner is None and migrated.is_leased("a/workspace")
    owner = LeaseOwner("attempt-1", "wf", "run")
    migrated.add_lease(
        migrated.new_lease("a/workspace#r2", "a", "r2", ("a/workspace",), owner=owner)
    )
    assert migrated.lease("a/workspace#r2").owner == owner  # type: ignore[union-attr]
    assert not (layout.meta_dir / "index.sqlite.corrupt").exists()  # migrated, not rebuilt
    with sqlite3.connect(layout.index_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
