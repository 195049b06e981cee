"""Eviction rules (TTL, LRU, orphans, leftovers), its safety rechecks, dry-run and make_room.

These use a minimal cache (settings, layout, index and the engine's real per-target flock);
tests/integration/test_gc_concurrency.py runs the same rules against the real WorkspaceCache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forgespace.cache import metrics
from forgespace.cache.eviction import collect_garbage, make_room
from forgespace.cache.index import CacheIndex, EntryRecord
from forgespace.cache.locks import flock
from forgespace.cache.staging import OwnerToken
from forgespace.config import Settings, parse_size
from forgespace.errors import BackendUnavailableError, CacheFullError, LockTimeoutError
from forgespace.layout import CacheLayout


@dataclass
class MiniCache:
    """What eviction needs from a WorkspaceCache, with a hook run when a lock is taken."""

    settings: Settings
    layout: CacheLayout = field(init=False)
    index: CacheIndex = field(init=False)
    on_lock: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.layout = CacheLayout(self.settings.cache_dir)
        self.index = CacheIndex(self.layout, lease_ttl=self.settings.cache_lease_ttl)

    @contextlib.contextmanager
    def target_lock(
        self,
        target_id: str,
        *,
        exclusive: bool = True,
        timeout: float | None = None,
        blocking: bool = True,
    ) -> Iterator[None]:
        with flock(
            self.layout.lock_path(target_id),
            exclusive=exclusive,
            timeout=timeout,
            blocking=blocking,
            what=f"target {target_id}",
        ):
            if self.on_lock is not None:
                self.on_lock(target_id)
            yield

    # -- building entries on disk + in the index ------------------------------------------
    def add(self, key: str, nbytes: int, *, age: float = 0.0) -> EntryRecord:
        tid, rest = key.split("/", 1)
        t = time.time() - age
        if rest == "workspace":
            ws = self.layout.shared_workspace(tid)
            (ws / "src").mkdir(parents=True)
            (ws / "src" / "main.c").write_bytes(b"x" * nbytes)
            self.layout.shared_target(tid).write_bytes(b"t")
            # shared workspaces are read-only on disk: files 0444, directories 0555
            os.chmod(ws / "src" / "main.c", 0o444)
            os.chmod(ws / "src", 0o555)
            os.chmod(ws, 0o555)
            e = EntryRecord(key, tid, "shared", None, "shared", nbytes, 2, t, t)
        elif rest == "shared":
            d = self.layout.cow_shared_workspace(tid)
            d.mkdir(parents=True)
            (d / "f").write_bytes(b"x" * nbytes)
            e = EntryRecord(key, tid, "cow-shared", None, "copy-on-write", nbytes, 1, t, t)
        else:
            d = self.layout.run_workspace(tid, rest)
            d.mkdir(parents=True)
            (d / "f").write_bytes(b"x" * nbytes)
            e = EntryRecord(key, tid, "run", rest, "isolated", nbytes, 1, t, t)
        self.index.publish(e)
        return e

    def on_disk(self, key: str) -> bool:
        return (self.layout.root / key).exists()


@pytest.fixture
def make_cache(tmp_path: Path) -> Callable[..., MiniCache]:
    def make(**env: str) -> MiniCache:
        base = {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
        # Limits of a few bytes: below what CACHE_MAX_SIZE accepts, so set past the variable.
        limit = env.pop("CACHE_MAX_SIZE", None)
        settings = Settings.from_env({**base, **env})
        if limit is not None:
            settings = settings.with_(cache_max_size=parse_size(limit))
        return MiniCache(settings)

    return make


def test_ttl_evicts_unleased_entries_not_accessed_for_cache_ttl(make_cache) -> None:
    c = make_cache(CACHE_TTL="1h")
    c.add("old/workspace", 100, age=7200)
    c.add("oldcow/shared", 50, age=7200)
    c.add("fresh/workspace", 100, age=10)
    c.add("oldleased/workspace", 100, age=7200)
    c.index.add_lease(
        c.index.new_lease("oldleased/workspace#r", "oldleased", "r", ("oldleased/workspace",))
    )
    before = metrics.value("forgespace_cache_evictions_total", reason="ttl")
    report = collect_garbage(c)
    assert {(p.key, p.reason) for p in report.plan} == {
        ("old/workspace", "ttl"),
        ("oldcow/shared", "ttl"),
    }
    assert (
        not c.on_disk("old/workspace") and not c.on_disk("old/target") and not c.on_disk("oldcow")
    )
    assert not c.layout.target_dir("old").exists()  # the emptied target dir goes too
    assert c.on_disk("fresh/workspace") and c.on_disk("oldleased/workspace")
    assert {e.key for e in c.index.entries()} == {"fresh/workspace", "oldleased/workspace"}
    assert report.freed_bytes == 150 and report.total_before == 350 and report.total_after == 200
    assert c.index.counters()["evictions_ttl"] == 2
    assert metrics.value("forgespace_cache_evictions_total", reason="ttl") == before + 2


def test_lru_evicts_least_recently_accessed_until_within_limit(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 400, age=50)  # oldest, but leased
    c.add("b/workspace", 400, age=40)
    c.add("c/shared", 400, age=30)
    c.add("d/workspace", 400, age=20)
    c.add("e/workspace", 100, age=10)
    c.index.add_lease(c.index.new_lease("a/workspace#r1", "a", "r1", ("a/workspace",)))
    report = collect_garbage(c)
    assert [(p.key, p.reason) for p in report.plan] == [("b/workspace", "lru"), ("c/shared", "lru")]
    assert report.total_after == 900 <= 1000
    assert [e.key for e in c.index.entries()] == ["a/workspace", "d/workspace", "e/workspace"]
    assert not c.on_disk("b") and not c.on_disk("c") and c.on_disk("a/workspace")


def test_leases_protect_until_ended_then_the_entry_goes(make_cache) -> None:
    c = make_cache(CACHE_TTL="1s")
    c.add("t/workspace", 10, age=5)
    c.add("t/r1", 10, age=5)
    c.index.add_lease(c.index.new_lease("t/workspace#r0", "t", "r0", ("t/workspace",)))
    c.index.add_lease(c.index.new_lease("t/r1", "t", "r1", ("t/r1",)))
    assert collect_garbage(c).plan == []
    assert c.on_disk("t/workspace") and c.on_disk("t/r1")
    c.index.end_lease("t/workspace#r0")
    report = collect_garbage(c)
    assert [(p.key, p.reason) for p in report.plan] == [("t/workspace", "ttl")]
    assert not c.on_disk("t/workspace") and c.on_disk("t/r1")


def test_run_directory_whose_lease_expired_is_an_orphan(make_cache) -> None:
    c = make_cache(CACHE_LEASE_TTL="1s")
    c.add("t/r1", 10)
    c.add("t/r2", 10)
    c.index.add_lease(c.index.new_lease("t/r1", "t", "r1", ("t/r1",), now=time.time() - 5))
    c.index.add_lease(c.index.new_lease("t/r2", "t", "r2", ("t/r2",)))
    report = collect_garbage(c)
    assert [(p.key, p.reason) for p in report.plan] == [("t/r1", "orphan")]
    assert not c.on_disk("t/r1") and c.on_disk("t/r2")
    assert [le.lease_id for le in c.index.all_leases()] == ["t/r2"]  # expired lease dropped


def test_dry_run_deletes_nothing_and_reports_the_plan(make_cache) -> None:
    c = make_cache(CACHE_TTL="1h", CACHE_MAX_SIZE="150")
    c.add("old/workspace", 100, age=7200)
    c.add("b/workspace", 100, age=60)
    c.add("c/workspace", 100, age=30)
    (c.layout.trash_dir / "x~1234").mkdir(parents=True)
    snapshot = sorted(str(p) for p in c.layout.root.rglob("*") if "index" not in p.name)
    report = collect_garbage(c, dry_run=True)
    assert report.dry_run
    assert [(p.key, p.reason, p.bytes) for p in report.plan] == [
        ("old/workspace", "ttl", 100),
        ("b/workspace", "lru", 100),
        (".forgespace/trash/x~1234", "leftover", 0),
    ]
    assert report.freed_bytes == 0 and report.total_before == 300 and report.total_after == 100
    assert sorted(str(p) for p in c.layout.root.rglob("*") if "index" not in p.name) == snapshot
    assert len(c.index.entries()) == 3
    assert c.index.counters() == {}


def test_busy_target_is_skipped_without_waiting(make_cache) -> None:
    c = make_cache(CACHE_TTL="1s")
    c.add("busy/workspace", 10, age=5)
    c.add("idle/workspace", 10, age=5)
    ready, release = mp.get_context("fork").Event(), mp.get_context("fork").Event()

    def hold() -> None:  # another process in the middle of a get_target of "busy"
        with flock(c.layout.lock_path("busy"), exclusive=False):
            ready.set()
            release.wait(30)

    p = mp.get_context("fork").Process(target=hold)
    p.start()
    try:
        assert ready.wait(10)
        t0 = time.monotonic()
        report = collect_garbage(c)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        p.join(10)
    assert [(s.key, s.why) for s in report.skipped] == [("busy/workspace", "target busy")]
    assert [p.key for p in report.evicted] == ["idle/workspace"]
    assert c.on_disk("busy/workspace") and c.index.get("busy/workspace") is not None


def test_lease_taken_after_the_plan_keeps_the_entry(make_cache) -> None:
    c = make_cache(CACHE_TTL="1s")
    c.add("t/workspace", 10, age=5)

    def get_target_sneaks_in(tid: str) -> None:
        # A get_target that finished between our plan and our lock: it leased the entry.
        c.index.access(
            "t/workspace",
            lease=c.index.new_lease("t/workspace#r", tid, "r", ("t/workspace",)),
            hit=True,
        )

    c.on_lock = get_target_sneaks_in
    report = collect_garbage(c)
    assert [(s.key, s.why) for s in report.skipped] == [("t/workspace", "leased")]
    assert c.on_disk("t/workspace")


def test_access_after_the_plan_keeps_the_entry(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="10")
    c.add("t/workspace", 100, age=5)
    c.on_lock = lambda tid: c.index.access("t/workspace", lease=None, hit=True)
    report = collect_garbage(c)
    assert [(s.key, s.why) for s in report.skipped] == [("t/workspace", "accessed since the plan")]
    assert c.on_disk("t/workspace")


def _make_dead_owner(owners: str, out: mp.Queue) -> None:
    out.put(OwnerToken(Path(owners)).token)


def test_leftovers_of_dead_processes_go_live_ones_stay(make_cache) -> None:
    c = make_cache()
    owners = c.layout.meta_dir / "owners"
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_make_dead_owner, args=(str(owners), q))
    p.start()
    dead_token = q.get(timeout=60)
    p.join(30)
    live_token = OwnerToken.for_dir(owners).token
    dead = c.layout.tmp_dir / f"t~shared~{dead_token}~abcd1234"
    live = c.layout.tmp_dir / f"t~shared~{live_token}~abcd1234"
    for d in (dead, live):
        (d / "workspace").mkdir(parents=True)
        (d / "workspace" / "half-extracted").write_bytes(b"y" * 30)
    os.chmod(dead / "workspace", 0o555)
    (c.layout.trash_dir / "gone~1").mkdir(parents=True)
    report = collect_garbage(c)
    assert {(p.key, p.kind, p.reason, p.bytes) for p in report.evicted} == {
        (f".forgespace/tmp/{dead.name}", "staging", "leftover", 30),
        (".forgespace/trash/gone~1", "trash", "leftover", 0),
    }
    assert not dead.exists() and live.exists()
    assert os.listdir(c.layout.trash_dir) == []
    # both count as leftover evictions (`cache status` shows them), the staging one's bytes too
    counters = c.index.counters()
    assert (counters.get("evictions_leftover"), counters.get("evicted_bytes")) == (2, 30)


def test_stale_rows_and_unindexed_run_dirs_are_reconciled(make_cache) -> None:
    c = make_cache()
    c.add("t/workspace", 10)
    c.add("t/r-leased", 10)
    c.index.add_lease(c.index.new_lease("t/r-leased", "t", "r-leased", ("t/r-leased",)))
    # a row whose directory is gone (crash between a deletion's rename and its index write)
    c.index.publish(
        EntryRecord("gone/workspace", "gone", "shared", None, "shared", 99, 1, 0, time.time())
    )
    # a run directory the index does not know, without a lease (its run is gone)
    (c.layout.run_workspace("t", "r-lost") / "f").parent.mkdir(parents=True)
    # ...and one that a live run leased but whose publish is not recorded yet
    c.layout.run_workspace("t", "r-new").mkdir(parents=True)
    c.index.add_lease(c.index.new_lease("t/r-new", "t", "r-new", ("t/r-new",)))
    report = collect_garbage(c)
    assert {(p.key, p.kind, p.reason) for p in report.evicted} == {
        ("gone/workspace", "stale-row", "orphan"),
        ("t/r-lost", "run", "orphan"),
    }
    assert c.index.get("gone/workspace") is None
    assert report.freed_bytes == 0  # the row's 99 bytes were not on disk any more
    assert not c.on_disk("t/r-lost") and c.on_disk("t/r-new") and c.on_disk("t/workspace")


def test_evicting_a_shared_entry_forgets_its_manifest(make_cache) -> None:
    from forgespace.cache import manifest as mf

    c = make_cache(CACHE_TTL="1s")
    c.add("t/workspace", 10, age=5)
    mf.write_manifest(mf.manifest_path(c.layout.meta_dir, "t", "shared"), [("src/main.c", 10, 1)])
    collect_garbage(c)
    assert not mf.manifest_path(c.layout.meta_dir, "t", "shared").exists()


def test_plan_reads_only_the_index_and_two_directory_levels(make_cache, monkeypatch) -> None:
    c = make_cache(CACHE_MAX_SIZE="1")
    c.add("t/workspace", 10)
    c.add("u/shared", 10)
    c.add("v/r1", 10)
    c.index.add_lease(c.index.new_lease("v/r1", "v", "r1", ("v/r1",)))
    opened: list[str] = []
    real_scandir, real_listdir, real_walk = os.scandir, os.listdir, os.walk

    def spy(real):
        return lambda path=".", *a, **k: opened.append(os.fspath(path)) or real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", spy(real_scandir))
    monkeypatch.setattr(os, "listdir", spy(real_listdir))
    monkeypatch.setattr(os, "walk", spy(real_walk))
    report = collect_garbage(c, dry_run=True)
    assert [p.key for p in report.plan] == ["t/workspace", "u/shared"]
    root = str(c.layout.root)
    depth = {len(os.path.relpath(p, root).split(os.sep)) for p in opened if p.startswith(root)}
    # CACHE_DIR, each {tid}/, and .forgespace/{tmp,trash,owners}: never inside an entry
    assert depth <= {1, 2} and os.path.relpath(opened[0], root) == "."
    assert not any("workspace" in p or p.endswith("/shared") for p in opened), opened


def test_make_room_evicts_other_targets_lru_first(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 300, age=50)
    c.add("mine/workspace", 300, age=60)  # the target being downloaded: never evicted here
    c.add("b/workspace", 300, age=40)
    c.add("l/workspace", 50, age=70)
    c.index.add_lease(c.index.new_lease("l/workspace#r", "l", "r", ("l/workspace",)))
    make_room(c, 300, target_id="mine")  # 950 cached + 300 > 1000: "a" must go
    assert [e.key for e in c.index.entries()] == ["l/workspace", "mine/workspace", "b/workspace"]
    assert not c.on_disk("a/workspace")
    make_room(c, 10, target_id="mine")  # fits already: nothing happens
    assert len(c.index.entries()) == 3


def test_make_room_warns_when_leases_prevent_fitting(make_cache, caplog) -> None:
    c = make_cache(CACHE_MAX_SIZE="100")
    c.add("l/workspace", 90)
    c.index.add_lease(c.index.new_lease("l/workspace#r", "l", "r", ("l/workspace",)))
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        make_room(c, 50, target_id="new")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == (
        "cache over its limit after evicting all it could: cache limit CACHE_MAX_SIZE=100 "
        "bytes, 90 bytes cached, incoming object 50 bytes for new; 1 live lease(s) pin 1 "
        "entry; proceeding"
    )
    assert c.on_disk("l/workspace")


def test_make_room_names_the_leased_entries_and_the_busy_ones(make_cache, caplog) -> None:
    c = make_cache(CACHE_MAX_SIZE="100")
    c.add("l/workspace", 40)
    c.add("l/shared", 30)
    c.add("busy/workspace", 20)
    c.index.add_lease(c.index.new_lease("l/r", "l", "r", ("l/workspace", "l/shared")))

    def hold_busy(tid: str) -> None:
        if tid == "busy":
            raise LockTimeoutError("held by a get_target in flight")

    c.on_lock = hold_busy
    metrics.CACHE_BYTES.set(-1)  # whatever an earlier test left there
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        make_room(c, 50, target_id="new")
    assert caplog.records[-1].getMessage() == (
        "cache over its limit after evicting all it could: cache limit CACHE_MAX_SIZE=100 "
        "bytes, 90 bytes cached, incoming object 50 bytes for new; 1 live lease(s) pin 2 "
        "entries (busy, not evicted: 1); proceeding"
    )
    assert metrics.value("forgespace_cache_bytes") == 90  # the gauges refreshed all the same
    assert c.on_disk("busy/workspace") and c.on_disk("l/workspace")


def test_make_room_goes_on_until_the_object_fits(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 100, age=50)
    c.add("b/workspace", 800, age=40)
    c.add("c/workspace", 50, age=30)
    metrics.CACHE_BYTES.set(-1)  # whatever an earlier test left there
    make_room(c, 300, target_id="new")  # 950 + 300: "a" alone leaves 850 + 300, "b" too
    assert [e.key for e in c.index.entries()] == ["c/workspace"]
    # the gauges follow what make_room evicted
    assert metrics.value("forgespace_cache_bytes") == 50


def test_make_room_refuses_what_the_disk_cannot_hold(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="100")
    with pytest.raises(CacheFullError) as info:
        make_room(c, 1 << 60, target_id="huge")
    assert info.value.errno == errno.ENOSPC
    free = shutil.disk_usage(c.layout.root).free
    assert str(info.value).startswith(
        f"no room for huge: cache limit CACHE_MAX_SIZE=100 bytes, 0 bytes cached, incoming "
        f"object {1 << 60} bytes for huge; 0 live lease(s) pin 0 entries; the filesystem has "
        "only "
    )
    assert str(info.value).endswith(" bytes free") and free > 0


@pytest.mark.parametrize(("free", "fits"), [(50, True), (49, False)])
def test_make_room_proceeds_when_the_disk_holds_the_object_to_the_byte(
    make_cache, monkeypatch, caplog, free: int, fits: bool
) -> None:
    """Over the limit with nothing evictable, the filesystem's free space decides: exactly the
    object's size is enough (a warning, then the download); one byte less is CacheFullError."""
    c = make_cache(CACHE_MAX_SIZE="100")
    c.add("l/workspace", 90)
    c.index.add_lease(c.index.new_lease("l/workspace#r", "l", "r", ("l/workspace",)))
    usage = shutil.disk_usage(c.layout.root)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        if fits:
            make_room(c, 50, target_id="new")
            assert caplog.records[-1].getMessage().endswith("entry; proceeding")
        else:
            with pytest.raises(CacheFullError, match="the filesystem has only 49 bytes free"):
                make_room(c, 50, target_id="new")
    assert c.on_disk("l/workspace")


def test_unindexed_shared_entries_are_adopted_then_evictable(make_cache) -> None:
    c = make_cache()
    # published on disk, but the process died before its index write
    ws = c.layout.shared_workspace("lost")
    ws.mkdir(parents=True)
    (ws / "a").write_bytes(b"a" * 40)
    c.layout.shared_target("lost").write_bytes(b"t" * 2)
    cow = c.layout.cow_shared_workspace("lostcow")
    cow.mkdir(parents=True)
    (cow / "b").write_bytes(b"b" * 8)
    assert collect_garbage(c, dry_run=True).adopted == []
    assert c.index.entries() == []
    report = collect_garbage(c)
    assert sorted(report.adopted) == ["lost/workspace", "lostcow/shared"]
    assert c.index.get("lost/workspace").bytes == 42  # type: ignore[union-attr]
    assert c.index.get("lostcow/shared").files == 1  # type: ignore[union-attr]
    small = make_cache(CACHE_MAX_SIZE="1")
    assert {p.key for p in collect_garbage(small).evicted} == {"lost/workspace", "lostcow/shared"}
    assert not c.layout.target_dir("lost").exists()


def test_empty_target_dirs_go_unless_busy(make_cache) -> None:
    c = make_cache()
    for tid in ("empty", "busy", "full"):
        c.layout.target_dir(tid).mkdir(parents=True)
    (c.layout.target_dir("full") / "r1").mkdir()
    c.index.add_lease(c.index.new_lease("full/r1", "full", "r1", ("full/r1",)))
    with flock(c.layout.lock_path("busy"), exclusive=False):  # a get_target about to publish
        collect_garbage(c)
    assert not c.layout.target_dir("empty").exists()
    assert c.layout.target_dir("busy").exists() and c.layout.target_dir("full").exists()


def _gc_as_nobody(settings: Settings, out: mp.Queue) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        report = collect_garbage(MiniCache(settings))
        out.put(([p.key for p in report.evicted], [s.why for s in report.skipped]))
    except Exception as exc:
        out.put((f"{type(exc).__name__}: {exc}", []))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the cache to another user")
def test_read_only_shared_workspace_is_deleted_without_root_powers() -> None:
    import shutil
    import tempfile

    # Root ignores permission bits; an ordinary user meets 0555 directories and 0444 files.
    from forgespace.cache import manifest, overlay  # noqa: F401  (imported before dropping privileges)

    base = Path(tempfile.mkdtemp(prefix="fs-gc-nobody-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        settings = Settings.from_env(
            {
                "CACHE_DIR": str(base / "cache"),
                "STORAGE_DIR": str(base / "store"),
                "CACHE_TTL": "1s",
            }
        )
        c = MiniCache(settings)
        c.add("ro/workspace", 10, age=5)
        c.index.close()
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, 65534, 65534)
        ws = c.layout.shared_workspace("ro")
        assert not os.stat(ws).st_mode & 0o222  # read-only on disk
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_gc_as_nobody, args=(settings, q))
        p.start()
        evicted, skipped = q.get(timeout=60)
        p.join(30)
        assert (evicted, skipped) == (["ro/workspace"], [])
        assert not c.layout.target_dir("ro").exists()
        assert os.listdir(c.layout.trash_dir) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_one_entry_that_cannot_be_removed_does_not_stop_gc(make_cache, monkeypatch) -> None:
    from forgespace.cache import eviction

    c = make_cache(CACHE_TTL="1s")
    c.add("bad/workspace", 10, age=5)
    c.add("good/workspace", 10, age=3)
    real = eviction._delete_via_trash

    def failing(layout, paths):
        if any("bad" in str(p) for p in paths):
            raise PermissionError(13, "Permission denied", str(paths[0]))
        return real(layout, paths)

    monkeypatch.setattr(eviction, "_delete_via_trash", failing)
    report = collect_garbage(c)
    assert [p.key for p in report.evicted] == ["good/workspace"]
    assert [(s.key, s.why.split(":")[0]) for s in report.skipped] == [("bad/workspace", "error")]
    assert c.index.get("bad/workspace") is not None and c.on_disk("bad/workspace")


def test_one_undeletable_lru_victim_does_not_fail_make_room(make_cache, monkeypatch) -> None:
    """make_room (before a download) meets the same per-victim guard as gc: a victim that
    cannot be removed is skipped and the next one goes, so an unrelated get_target succeeds."""
    from forgespace.cache import eviction

    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("bad/workspace", 400, age=30)  # least recently used: the first victim
    c.add("good/workspace", 400, age=20)
    real = eviction._delete_via_trash

    def failing(layout, paths):
        if any("bad" in str(p) for p in paths):
            raise PermissionError(13, "Permission denied", str(paths[0]))
        return real(layout, paths)

    monkeypatch.setattr(eviction, "_delete_via_trash", failing)
    make_room(c, 500, target_id="mine")  # 800 + 500 > 1000: one victim must go
    assert not c.on_disk("good/workspace") and c.index.get("good/workspace") is None
    assert c.on_disk("bad/workspace") and c.index.get("bad/workspace") is not None


# --- boundaries: "within the limit" includes exactly at it --------------------------------


def test_lru_stops_when_the_cache_is_exactly_at_its_limit(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 300, age=50)
    c.add("b/workspace", 300, age=40)
    c.add("c/workspace", 400, age=30)
    c.add("d/workspace", 300, age=20)
    report = collect_garbage(c)  # 1300 cached: evicting "a" leaves exactly 1000
    assert [(p.key, p.reason) for p in report.plan] == [("a/workspace", "lru")]
    assert report.total_after == 1000
    assert collect_garbage(c).plan == []  # at the limit is within it: nothing more goes


def test_make_room_evicts_nothing_when_the_object_fits_exactly(make_cache) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 300, age=50)
    c.add("b/workspace", 400, age=40)
    make_room(c, 300, target_id="new")  # 700 + 300 == 1000
    assert [e.key for e in c.index.entries()] == ["a/workspace", "b/workspace"]


def test_make_room_stops_as_soon_as_the_object_fits_exactly(make_cache, caplog) -> None:
    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 300, age=50)
    c.add("b/workspace", 300, age=40)
    c.add("c/workspace", 400, age=30)
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        make_room(c, 300, target_id="new")  # 1000 + 300: evicting "a" leaves 700 + 300
    assert [e.key for e in c.index.entries()] == ["b/workspace", "c/workspace"]
    assert c.on_disk("b/workspace") and not c.on_disk("a/workspace")
    assert caplog.records == []  # it fits: no "over its limit" warning


@pytest.fixture
def mounted() -> Iterator[Callable[..., Path]]:
    """``mounted(path)`` puts a small tmpfs on ``path``, ``mounted(path, lower=dir,
    layers=dir)`` an overlay of ``dir`` as a copy-on-write run has (root only: skipped
    otherwise); whatever is still mounted after the test is unmounted."""
    from support.mounts import MountRefused, tmpfs

    from forgespace.cache import overlay

    stack = contextlib.ExitStack()

    def mount(path: Path, *, lower: Path | None = None, layers: Path | None = None) -> Path:
        if lower is None:
            try:
                return stack.enter_context(tmpfs(path, size="1m"))
            except MountRefused as exc:
                pytest.skip(f"cannot mount a tmpfs here: {exc}")
        assert layers is not None
        (layers / "upper").mkdir(parents=True)
        (layers / "work").mkdir()
        try:
            overlay.mount_overlay(lower, layers / "upper", layers / "work", path)
        except (OSError, BackendUnavailableError) as exc:
            pytest.skip(f"cannot mount an overlay here: {exc}")
        stack.callback(overlay.unmount, path)
        return path

    with stack:
        yield mount


def test_mounts_in_live_runs_are_kept_and_in_dead_runs_go_with_the_run(make_cache, mounted) -> None:
    from forgespace.cache.overlay import mounts_under

    c = make_cache(CACHE_LEASE_TTL="1h")
    c.add("t/shared", 10)
    c.add("t/live", 10)
    c.add("t/dead", 10)
    c.index.add_lease(c.index.new_lease("t/live", "t", "live", ("t/live",)))
    lower = c.layout.cow_shared_workspace("t")
    # copy-on-write runs on the overlay backend: the shared copy under each run's own layers
    live = mounted(
        c.layout.run_workspace("t", "live"), lower=lower, layers=c.layout.overlay_dir / "t/live"
    )
    dead = mounted(
        c.layout.run_workspace("t", "dead"), lower=lower, layers=c.layout.overlay_dir / "t/dead"
    )
    others = [
        mounted(c.layout.cow_shared_workspace("t") / "mnt"),  # not in a run directory
        mounted(c.layout.shared_workspace("t") / "mnt"),  # nor is the shared workspace
        mounted(c.layout.tmp_dir / "staging-mnt"),  # bookkeeping, not a target
    ]
    plan = collect_garbage(c, dry_run=True).plan
    # the dead run's mount goes with its run directory; the live run's is not planned
    assert [(p.key, p.kind, p.reason) for p in plan] == [("t/dead", "run", "orphan")]
    report = collect_garbage(c)
    assert [(p.key, p.kind) for p in report.evicted] == [("t/dead", "run")]
    assert report.skipped == []
    assert sorted(mounts_under(c.layout.root)) == sorted([live, *others])
    assert dead not in mounts_under(c.layout.root) and not c.on_disk("t/dead")
    assert not (c.layout.overlay_dir / "t/dead").exists()
    assert c.on_disk("t/live") and c.on_disk("t/shared")


def test_gc_json_document_has_the_documented_shape(make_cache) -> None:
    # `cache gc --json` prints GcReport.to_dict(): the fields docs/operations.md documents
    c = make_cache(CACHE_TTL="1h", CACHE_MAX_SIZE="150")
    old = c.add("old/workspace", 100, age=7200)
    c.add("busy/workspace", 100, age=7000)
    c.add("new/workspace", 100, age=1)

    def hold_busy(tid: str) -> None:
        if tid == "busy":
            raise LockTimeoutError("held by another process")

    c.on_lock = hold_busy
    report = collect_garbage(c)
    doc = report.to_dict()
    assert doc.pop("plan_seconds") == round(report.plan_seconds, 6)  # microseconds
    assert doc.pop("seconds") == round(report.seconds, 6)
    item = {"key": "old/workspace", "target_id": "old", "kind": "shared", "reason": "ttl",
            "bytes": 100, "last_access": old.last_access}  # fmt: skip
    busy = {**item, "key": "busy/workspace", "target_id": "busy"}
    busy["last_access"] = c.index.get("busy/workspace").last_access  # type: ignore[union-attr]
    assert doc == {
        "dry_run": False,
        "limit_bytes": 150,
        "total_before": 300,
        "total_after": 200,
        "freed_bytes": 100,
        "plan": [item, busy],
        "evicted": [item],
        "skipped": [{"key": "busy/workspace", "target_id": "busy", "why": "target busy"}],
        "adopted": [],
    }
    # an unindexed trash entry has no last access: null, not 0
    (c.layout.trash_dir / "x~1").mkdir(parents=True)
    dry = collect_garbage(c, dry_run=True).to_dict()
    assert dry["plan"][-1] == {"key": ".forgespace/trash/x~1", "target_id": "", "kind": "trash",
                               "reason": "leftover", "bytes": 0, "last_access": None}  # fmt: skip
    assert dry["dry_run"] is True and dry["evicted"] == [] and dry["skipped"] == []


def test_evict_target_refuses_while_leased_and_force_ends_the_leases(make_cache, caplog) -> None:
    from forgespace.cache import manifest as mf
    from forgespace.cache.eviction import PlannedEviction, evict_target
    from forgespace.errors import CleanupRefusedError

    c = make_cache()
    ws = c.add("t/workspace", 100)
    cow = c.add("t/shared", 50)
    run = c.add("t/r1", 10)
    c.add("u/workspace", 7)
    shared_manifest = mf.manifest_path(c.layout.meta_dir, "t", "shared")
    mf.write_manifest(shared_manifest, [("src/main.c", 100, 1)])
    for i in range(6):
        lease = c.index.new_lease(
            f"t/workspace#r{i}", "t", f"r{i}", ("t/workspace",), holder=f"h{i}"
        )
        c.index.add_lease(lease)
    c.index.add_lease(c.index.new_lease("u/workspace#x", "u", "x", ("u/workspace",)))
    before = metrics.value("forgespace_cache_evictions_total", reason="operator")
    with pytest.raises(CleanupRefusedError) as ei:
        evict_target(c, "t")
    named = ", ".join(f"t/workspace#r{i} (held by h{i})" for i in range(5))
    assert str(ei.value) == (  # five named, the rest elided
        f"refusing to evict target t: 6 live lease(s) pin it: {named} ...; end those runs "
        "(cleanup) or pass --force; nothing was deleted"
    )
    assert c.on_disk("t/workspace") and c.on_disk("t/r1") and len(c.index.entries_of("t")) == 3

    metrics.CACHE_BYTES.set(-1)  # whatever an earlier test left there
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        evicted = evict_target(c, "t", force=True)
    assert set(evicted) == {
        PlannedEviction(e.key, "t", e.kind, "operator", e.bytes, e.last_access)
        for e in (ws, cow, run)
    }
    assert caplog.records[-1].getMessage() == "evicted target t (3 entries) on request"
    assert not c.layout.target_dir("t").exists() and not shared_manifest.exists()
    assert c.index.entries_of("t") == []
    assert [le.lease_id for le in c.index.live_leases()] == ["u/workspace#x"]  # others' stay
    assert c.on_disk("u/workspace")
    assert c.index.counters()["evictions_operator"] == 3
    assert metrics.value("forgespace_cache_evictions_total", reason="operator") == before + 3
    assert metrics.value("forgespace_cache_bytes") == 7  # the gauges follow
    assert evict_target(c, "t") == []  # nothing left: nothing to do, no error


def test_evict_target_with_one_lease_names_it_and_checks_the_id(make_cache) -> None:
    from forgespace.cache.eviction import evict_target
    from forgespace.errors import CleanupRefusedError, InvalidIdError

    c = make_cache()
    c.add("t/workspace", 100)
    c.index.add_lease(c.index.new_lease("t/workspace#r", "t", "r", ("t/workspace",), holder="h"))
    with pytest.raises(CleanupRefusedError) as ei:
        evict_target(c, "t")
    assert str(ei.value) == (
        "refusing to evict target t: 1 live lease(s) pin it: t/workspace#r (held by h); end "
        "those runs (cleanup) or pass --force; nothing was deleted"
    )
    for i in range(2, 6):  # five leases: all named, nothing elided
        c.index.add_lease(
            c.index.new_lease(f"t/workspace#r{i}", "t", f"r{i}", ("t/workspace",), holder="h")
        )
    with pytest.raises(CleanupRefusedError) as ei:
        evict_target(c, "t")
    assert str(ei.value).startswith("refusing to evict target t: 5 live lease(s) pin it: ")
    assert str(ei.value).count("(held by h)") == 5 and " ..." not in str(ei.value)
    with pytest.raises(InvalidIdError, match=r"^invalid target_id '\.\./t': expected "):
        evict_target(c, "../t")
    assert c.on_disk("t/workspace")


def test_evict_target_waits_for_a_get_in_flight_at_most_its_timeout(make_cache) -> None:
    from forgespace.cache.eviction import evict_target

    c = make_cache()
    c.add("t/workspace", 100)
    # another holder of the target's lock (a get_target in flight): flock conflicts between
    # two open file descriptions, even in one process
    with flock(c.layout.lock_path("t"), what="target t"):
        started = time.monotonic()
        with pytest.raises(LockTimeoutError):
            evict_target(c, "t", timeout=0.2)
        assert time.monotonic() - started < 60  # bounded, however slow the machine
    assert c.on_disk("t/workspace")


def test_evict_entry_evicts_one_unleased_entry_of_an_idle_target(make_cache) -> None:
    from forgespace.cache import manifest as mf
    from forgespace.cache.eviction import evict_entry

    c = make_cache()
    c.add("t/shared", 50)
    c.add("t/workspace", 10)
    c.index.add_lease(c.index.new_lease("t/workspace#r", "t", "r", ("t/workspace",)))
    assert evict_entry(c, "t/nothing") is False
    assert evict_entry(c, "t/workspace") is False and c.on_disk("t/workspace")  # leased
    manifest = mf.manifest_path(c.layout.meta_dir, "t", "cow")
    mf.write_manifest(manifest, [("f", 50, 1)])
    assert evict_entry(c, "t/shared") is True
    assert not c.on_disk("t/shared") and c.index.get("t/shared") is None
    assert not manifest.exists()  # its records went with it
    assert c.index.counters()["evictions_operator"] == 1


def test_make_room_evicts_victims_as_gc_would_records_and_layers_included(make_cache) -> None:
    from forgespace.cache import manifest as mf

    c = make_cache(CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 400, age=50)
    c.add("b/r1", 400, age=40)  # a run of another target without a lease: an orphan
    layers = c.layout.overlay_dir / "b" / "r1" / "upper"
    layers.mkdir(parents=True)  # its overlay layers (overlay backend)
    manifest = mf.manifest_path(c.layout.meta_dir, "a", "shared")
    mf.write_manifest(manifest, [("src/main.c", 400, 1)])
    make_room(c, 1000, target_id="new")
    assert c.index.entries() == []
    assert not c.on_disk("a/workspace") and not manifest.exists()  # its records went too
    assert not c.on_disk("b/r1") and not (c.layout.overlay_dir / "b" / "r1").exists()


def test_what_changed_between_the_plan_and_the_lock_is_skipped_and_said_why(make_cache) -> None:
    # `cache gc --json` reports each skip's reason (docs/operations.md): here the changes a
    # publish, a cleanup or another gc make after the plan, seen under the target's lock
    c = make_cache(CACHE_LEASE_TTL="1h")
    c.index.publish(EntryRecord("back/workspace", "back", "shared", None, "shared", 5, 1, 0, 1))
    c.index.publish(EntryRecord("twice/workspace", "twice", "shared", None, "shared", 5, 1, 0, 1))
    c.add("r/r1", 10)  # a run without a lease: an orphan
    c.add("o/workspace", 20, age=10)  # over the limit below: LRU

    def meanwhile(tid: str) -> None:
        if tid == "back":  # published again: the row is not stale any more
            c.layout.shared_workspace("back").mkdir(parents=True)
        elif tid == "twice":  # another gc dropped the stale row first
            c.index.remove("twice/workspace")
        elif tid in ("r", "o"):  # cleaned up (row gone) by its run / an operator meanwhile
            c.index.remove("r/r1" if tid == "r" else "o/workspace")

    c.on_lock = meanwhile
    c.settings = c.settings.with_(cache_max_size=15)
    report = collect_garbage(c)
    assert sorted((s.key, s.why) for s in report.skipped) == [
        ("back/workspace", "back on disk"),
        ("o/workspace", "already gone"),
        ("r/r1", "already gone"),
        ("twice/workspace", "already gone"),
    ]
    assert report.evicted == []
    assert c.on_disk("r/r1") and c.on_disk("o/workspace")


def test_gc_counts_freed_bytes_and_forgets_copy_on_write_records(make_cache) -> None:
    from forgespace.cache import manifest as mf

    c = make_cache(CACHE_TTL="1s")
    c.add("t/shared", 30, age=5)
    c.add("u/workspace", 12, age=5)
    cow = mf.manifest_path(c.layout.meta_dir, "t", "cow")
    mf.write_manifest(cow, [("f", 30, 1)])
    report = collect_garbage(c)
    assert {p.key for p in report.evicted} == {"t/shared", "u/workspace"}
    assert not cow.exists()  # the copy-on-write copy's records went with it
    assert c.index.counters()["evicted_bytes"] == 42
    assert c.index.counters()["evictions_ttl"] == 2


def _planted_link_refusal(link: Path, outside: Path, prefix: str = "") -> str:
    """The warning that opens with how forgespace refuses a symlink a run planted at ``link``
    (to ``outside``) where it expects one of its own directories."""
    return (
        f"{prefix}{link} is a symbolic link (to {str(outside)!r}) where forgespace "
        "expects a directory; refusing to use it (never followed)"
    )


def test_a_planted_trash_is_never_followed_and_gc_says_so(make_cache, tmp_path, caplog) -> None:
    c = make_cache(CACHE_TTL="1s")
    c.add("t/workspace", 10, age=5)
    outside = tmp_path / "outside"
    outside.mkdir()
    if c.layout.trash_dir.exists():
        c.layout.trash_dir.rmdir()
    c.layout.trash_dir.symlink_to(outside)  # a run planted it: deletions would land outside
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        collect_garbage(c)
    refusal = _planted_link_refusal(c.layout.trash_dir, outside)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(refusal) for m in messages), messages  # said where, and why
    assert list(outside.iterdir()) == []  # nothing was moved through the link


def test_retired_shared_workspaces_go_once_no_lease_pins_the_target(make_cache) -> None:
    """A repair keeps a tampered shared workspace aside as ``{tid}/.retired-*`` while leased
    runs still work in it; gc removes it only once no lease pins the target's workspace (and
    not while another process holds the target's lock), other targets' alike."""
    c = make_cache()
    c.add("t/workspace", 10)
    c.add("u/workspace", 10)
    kept = []
    for tid in ("t", "u"):
        aside = c.layout.target_dir(tid) / ".retired-0123456789ab"
        (aside / "src").mkdir(parents=True)
        (aside / "src" / "main.c").write_bytes(b"tampered")
        os.chmod(aside / "src", 0o555)  # as read-only as the workspace it was
        kept.append(aside)
    lease = c.index.new_lease("t/workspace#r1", "t", "r1", ("t/workspace",))
    c.index.add_lease(lease)
    collect_garbage(c)
    assert kept[0].exists() and not kept[1].exists()  # t's is pinned; u's went
    c.index.end_lease(lease.lease_id)
    with flock(c.layout.lock_path("t"), exclusive=True, what="target t"):
        busy = mp.get_context("fork").Process(target=collect_garbage, args=(c,))
        busy.start()
        busy.join(60)
    assert busy.exitcode == 0 and kept[0].exists()  # busy target: skipped, never waited on
    collect_garbage(c)
    assert not kept[0].exists()
    assert c.on_disk("t/workspace") and c.on_disk("u/workspace")


def test_gc_never_unmounts_an_overlay_outside_a_run_directory(
    make_cache, mounted, tmp_path
) -> None:
    """gc looks only at the overlays in run directories: a get_target staging its overlay in
    .forgespace/tmp right now, and overlays inside a shared copy or a shared workspace, are
    neither planned nor unmounted."""
    from forgespace.cache.overlay import mounts_under

    c = make_cache()
    c.add("t/shared", 10)
    c.add("t/workspace", 10)
    owner = OwnerToken.for_dir(c.layout.meta_dir / "owners")  # this process: alive
    stage = c.layout.tmp_dir / f"t~run~{owner.token}~abcd1234"
    lower = tmp_path / "lower"
    lower.mkdir()
    overlays = []
    for i, mp_ in enumerate(
        [
            stage / "workspace",  # a staging attempt in flight
            c.layout.cow_shared_workspace("t") / "mnt",  # inside the copy-on-write copy
            c.layout.shared_workspace("t") / "mnt",  # inside the shared workspace
        ]
    ):
        mp_.mkdir(parents=True)
        overlays.append(mounted(mp_, lower=lower, layers=tmp_path / f"layers{i}"))
    assert collect_garbage(c, dry_run=True).plan == []
    report = collect_garbage(c)
    assert report.evicted == [] and report.skipped == []
    assert sorted(mounts_under(c.layout.root)) == sorted(overlays)


def test_an_overlay_in_a_directory_outside_the_id_rules_is_unmounted_as_an_orphan(
    make_cache, mounted, tmp_path
) -> None:
    """An overlay in a directory of a target that no run of forgespace can have made (a name
    outside the id rules, so no lease can pin it, and gc does not take it for a run): gc
    plans the mount alone, unmounts it and reports it; the directory is not gc's and stays."""
    from forgespace.cache.overlay import mounts_under

    c = make_cache()
    c.add("t/shared", 10)
    stray = c.layout.target_dir("t") / "_old run" / "workspace"
    stray.mkdir(parents=True)
    (tmp_path / "lower").mkdir()
    mounted(stray, lower=tmp_path / "lower", layers=tmp_path / "layers")
    key = "t/_old run/workspace"
    dry = collect_garbage(c, dry_run=True)
    assert [(p.key, p.target_id, p.kind, p.reason, p.bytes) for p in dry.plan] == [
        (key, "t", "mount", "orphan", 0)
    ]
    report = collect_garbage(c)
    assert [(p.key, p.kind) for p in report.evicted] == [(key, "mount")]
    assert report.skipped == [] and report.freed_bytes == 0
    assert stray not in mounts_under(c.layout.root)
    assert stray.is_dir() and c.on_disk("t/shared")  # only the mount went
    assert c.index.counters()["evictions_orphan"] == 1


class _AtVictimChecked:
    """Hooks recording, at each GC_VICTIM_CHECKED, which targets' locks are held and which
    entries are still on disk."""

    def __init__(self, c: MiniCache, keys: list[str]) -> None:
        self.c, self.keys, self.seen = c, keys, []

    def reached(self, phase: object) -> None:
        from forgespace.cache.hooks import Phase

        if phase != Phase.GC_VICTIM_CHECKED:
            return
        held = set()
        for key in self.keys:
            tid = key.split("/")[0]
            try:
                with flock(self.c.layout.lock_path(tid), exclusive=False, blocking=False):
                    pass
            except LockTimeoutError:
                held.add(tid)
        self.seen.append((held, {k for k in self.keys if self.c.on_disk(k)}))


def test_each_victim_is_deleted_under_its_target_lock_after_its_recheck(make_cache) -> None:
    """The safety rule of the module: a victim's re-check and its deletion happen under its
    target's lock (a get_target of that target waits), and a victim kept by the re-check is
    reported with its target."""
    from forgespace.cache.eviction import SkippedEviction

    c = make_cache(CACHE_TTL="1s", CACHE_LEASE_TTL="1h")
    c.add("a/workspace", 10, age=5)
    c.add("b/r1", 10)  # no lease: an orphan
    c.add("k/workspace", 10, age=5)
    keys = ["a/workspace", "b/r1", "k/workspace"]
    hooks = _AtVictimChecked(c, keys)
    c.hooks = hooks  # type: ignore[attr-defined]

    def leased_meanwhile(tid: str) -> None:
        if tid == "k":
            c.index.add_lease(c.index.new_lease("k/workspace#r", "k", "r", ("k/workspace",)))

    c.on_lock = leased_meanwhile
    report = collect_garbage(c)
    assert sorted(p.key for p in report.evicted) == ["a/workspace", "b/r1"]
    assert report.skipped == [SkippedEviction("k/workspace", "k", "leased")]
    # one stop per victim deleted (orphans first), each with its own target locked and the
    # victim still there
    assert [(sorted(held), sorted(there)) for held, there in hooks.seen] == [
        (["b"], keys),
        (["a"], ["a/workspace", "k/workspace"]),
    ]
    assert not c.on_disk("a/workspace") and not c.on_disk("b/r1") and c.on_disk("k/workspace")


def test_gc_and_evict_on_a_full_disk_delete_and_name_the_index_writes_they_skip(
    make_cache, monkeypatch, caplog
) -> None:
    """On a full disk the index cannot record a deletion: gc and `cache evict` delete anyway
    (that is what frees the disk), say which index write they skipped, and the next gc, with
    room again, drops the rows left behind and indexes what it could not."""
    from forgespace.cache.eviction import evict_target

    c = make_cache(CACHE_TTL="1s")
    c.add("t/workspace", 10, age=5)
    c.add("u/r1", 5)  # a run without a lease: an orphan
    c.add("w/workspace", 7)
    c.index.remove("w/workspace")  # on disk, not in the index: gc adopts it
    c.add("v/workspace", 3)
    c.index.add_lease(c.index.new_lease("v/workspace#r", "v", "r", ("v/workspace",)))

    def full(*args: object, **kwargs: object) -> None:
        raise CacheFullError(errno.ENOSPC, "No space left on device")

    for write in ("remove", "end_lease", "publish", "count", "purge_expired_leases"):
        monkeypatch.setattr(c.index, write, full)
    with caplog.at_level(logging.DEBUG, logger="forgespace.cache.index"):
        report = collect_garbage(c)
        gc_said = [r.getMessage() for r in caplog.records]
        caplog.clear()
        evicted = evict_target(c, "v", force=True)
        evict_said = [r.getMessage() for r in caplog.records]
    assert sorted(p.key for p in report.evicted) == ["t/workspace", "u/r1"]
    assert (
        report.skipped == []
        and report.adopted == []
        and [e.key for e in evicted] == ["v/workspace"]
    )
    assert not any(c.on_disk(k) for k in ("t/workspace", "u/r1", "v/workspace"))

    def skipped(said: list[str], what: str) -> bool:
        return any(f"skipped writing the cache index ({what})" in m for m in said)

    assert skipped(gc_said, "forget an evicted entry"), gc_said
    assert skipped(gc_said, "index an entry found on disk"), gc_said
    assert skipped(gc_said, "drop expired leases"), gc_said
    assert skipped(evict_said, "end a lease of an evicted target"), evict_said
    assert skipped(evict_said, "forget an evicted entry"), evict_said
    monkeypatch.undo()  # room again
    assert collect_garbage(c).adopted == ["w/workspace"]
    assert [e.key for e in c.index.entries()] == ["w/workspace"]  # the rows left were dropped


def test_gc_adopts_unindexed_entries_unless_busy_published_meanwhile_or_runs(
    make_cache, caplog
) -> None:
    """Entries on disk the index does not know (a crash between publish's rename and its index
    write) are indexed by gc, each under its target lock: not while another process holds
    that lock (it may be publishing it right now: the next gc looks again), not when a publish
    indexed it between gc's listing and the lock (its row stays as published), and never a
    run directory. gc says what it indexed."""
    c = make_cache(CACHE_LEASE_TTL="1h")
    c.add("a/workspace", 10)  # indexed: listed first, nothing to do
    for key in ("b/workspace", "c/shared", "d/workspace", "e/workspace", "f/r1"):
        c.add(key, 10)
        c.index.remove(key)
    c.index.add_lease(c.index.new_lease("f/r1", "f", "r1", ("f/r1",)))  # a live run
    published = EntryRecord("d/workspace", "d", "shared", None, "shared", 99, 3, 1.0, 2.0)

    def publish_meanwhile(tid: str) -> None:
        if tid == "d" and c.index.get("d/workspace") is None:
            c.index.publish(published)

    c.on_lock = publish_meanwhile

    def said() -> list[str]:
        return [m for r in caplog.records if (m := r.getMessage()).startswith("indexed ")]

    with (
        flock(c.layout.lock_path("b"), what="target b"),  # another process's get_target
        caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"),
    ):
        report = collect_garbage(c)
    assert report.adopted == ["c/shared", "e/workspace"]
    assert said() == [
        "indexed 2 entries found on disk but missing from the index: c/shared, e/workspace"
    ]
    d = c.index.get("d/workspace")
    assert d is not None and (d.bytes, d.files) == (99, 3)  # as published, not re-measured
    assert c.index.get("b/workspace") is None and c.index.get("f/r1") is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        assert collect_garbage(c).adopted == ["b/workspace"]  # free now
    assert said() == ["indexed 1 entry found on disk but missing from the index: b/workspace"]
    assert c.index.get("f/r1") is None and c.on_disk("f/r1")


def test_gc_walks_no_entry_but_the_one_it_adopts(make_cache, monkeypatch) -> None:
    """gc takes sizes from the index and lists two directory levels: the only entry whose
    files it walks is one it adopts (measured once)."""
    c = make_cache()
    c.add("t/workspace", 10)
    c.add("u/shared", 10)
    c.add("v/r1", 10)
    c.index.add_lease(c.index.new_lease("v/r1", "v", "r1", ("v/r1",)))
    c.add("w/workspace", 10)
    c.index.remove("w/workspace")
    opened: list[str] = []
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if not isinstance(path, int):
            opened.append(os.fspath(path))  # type: ignore[arg-type]
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)
    assert collect_garbage(c).adopted == ["w/workspace"]
    root = str(c.layout.root)
    inside = [os.path.relpath(p, root) for p in opened if p.startswith(root + os.sep)]
    walked = {p for p in inside if not p.startswith(".forgespace") and os.sep in p}
    assert walked and all(p.startswith("w" + os.sep) for p in walked), sorted(walked)


def test_reclaim_retired_returns_what_went_and_skips_without_stopping(
    make_cache, monkeypatch, caplog
) -> None:
    """Among many targets: the retired workspaces of idle targets go (returned, and counted in
    one log line); a busy target's and those of a target directory gc cannot list stay, and
    neither they nor targets without any stop the others."""
    from forgespace.cache.eviction import reclaim_retired

    c = make_cache()
    root = str(c.layout.root)
    retired: dict[str, Path] = {}
    for i in range(4):  # interleaved: whatever order the directory lists them in
        for kind in ("r", "p", "b", "x"):
            tid = f"{kind}{i}"
            c.add(f"{tid}/workspace", 1)
            if kind != "p":
                retired[tid] = c.layout.target_dir(tid) / ".retired-0123456789ab"
                (retired[tid] / "src").mkdir(parents=True)

    def busy(tid: str) -> None:
        if tid.startswith("b"):
            raise LockTimeoutError("held by another process")

    c.on_lock = busy
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        p = path if isinstance(path, int) else os.fspath(path)  # type: ignore[arg-type]
        if isinstance(p, str) and os.path.dirname(p) == root and os.path.basename(p)[0] == "x":
            raise PermissionError(errno.EACCES, "Permission denied", p)  # not listable
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        gone = reclaim_retired(c)
    idle = sorted(p for tid, p in retired.items() if tid[0] == "r")
    assert sorted(gone) == idle
    assert [p for p in retired.values() if p.exists()] == [
        p for tid, p in retired.items() if tid[0] != "r"
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "gc: removed 4 retired shared workspace(s) no run uses any more"
    ]


def test_gc_json_times_are_seconds_to_the_microsecond() -> None:
    from forgespace.cache.eviction import GcReport

    doc = GcReport([], 0, 0, 0, False, plan_seconds=0.0123456789, seconds=1.23456789).to_dict()
    assert (doc["plan_seconds"], doc["seconds"]) == (0.012346, 1.234568)


def test_cache_evict_never_follows_a_planted_overlay_dir_and_says_so(
    make_cache, tmp_path, caplog
) -> None:
    """`cache evict` removes the target's overlay layers too: where a run planted a symlink
    instead of .forgespace/overlay, it deletes nothing through it, deletes the rest and logs
    the refusal."""
    from forgespace.cache.eviction import evict_target

    c = make_cache()
    c.add("t/workspace", 10)
    outside = tmp_path / "outside"
    (outside / "t" / "r1").mkdir(parents=True)  # what the link would lead the deletion to
    c.layout.overlay_dir.parent.mkdir(parents=True, exist_ok=True)
    if c.layout.overlay_dir.exists():
        c.layout.overlay_dir.rmdir()
    c.layout.overlay_dir.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        evict_target(c, "t")
    refusal = _planted_link_refusal(c.layout.overlay_dir, outside)
    said = [r.getMessage() for r in caplog.records if r.name == "forgespace.cache.eviction"]
    assert said and all(m.startswith(refusal) for m in said), said
    assert (outside / "t" / "r1").is_dir() and not c.on_disk("t/workspace")


def test_gc_says_what_it_evicted_and_what_it_could_not_with_the_error(
    make_cache, monkeypatch, caplog
) -> None:
    """Each eviction is logged (debug: key, kind, reason, bytes freed); a victim that cannot be
    removed is logged as a warning with the error and reported skipped with its target."""
    from forgespace.cache import fsops
    from forgespace.cache.eviction import SkippedEviction

    c = make_cache(CACHE_TTL="1s")
    c.add("bad/workspace", 10, age=5)
    c.add("good/r1", 7)  # a run without a lease: an orphan
    real = fsops.discard
    refused = PermissionError(errno.EACCES, "Permission denied", "bad/workspace")

    def discard(root: Path, path: Path) -> None:
        if "bad" in str(path):
            raise refused
        real(root, path)

    monkeypatch.setattr(fsops, "discard", discard)
    with caplog.at_level(logging.DEBUG, logger="forgespace.cache.eviction"):
        report = collect_garbage(c)
    assert [p.key for p in report.evicted] == ["good/r1"]
    assert report.skipped == [SkippedEviction("bad/workspace", "bad", f"error: {refused}")]
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("DEBUG", "evicted good/r1 (run, orphan, 7 bytes)") in said, said
    assert ("WARNING", f"gc: could not evict bad/workspace: {refused}") in said, said


def test_gc_leaves_what_is_not_a_target_directory_alone(make_cache, tmp_path) -> None:
    """Only real directories with a target id are target directories: an empty directory
    named outside the id rules (the lost+found of a cache on its own filesystem) is not
    removed as an empty target directory, and a symlink a run planted with a target's name is
    never followed to reclaim or remove what it points to."""
    c = make_cache()
    c.add("t/workspace", 10)
    lost = c.layout.root / "lost+found"
    lost.mkdir()
    outside = tmp_path / "outside"
    (outside / ".retired-0123456789ab" / "src").mkdir(parents=True)
    (c.layout.root / "planted").symlink_to(outside)
    (tmp_path / "empty").mkdir()
    (c.layout.root / "planted2").symlink_to(tmp_path / "empty")
    report = collect_garbage(c)
    assert report.evicted == [] and report.skipped == []
    assert lost.is_dir() and (outside / ".retired-0123456789ab" / "src").is_dir()
    assert (c.layout.root / "planted").is_symlink() and (c.layout.root / "planted2").is_symlink()
    assert (tmp_path / "empty").is_dir() and c.on_disk("t/workspace")


def test_gc_sums_up_what_it_did_in_one_line_and_times_its_plan(make_cache, caplog) -> None:
    """What an operator reads after a gc: one line with what was evicted, the bytes freed, the
    indexed total before and after, the limit and what was skipped, and one for the expired
    leases it dropped; the report's times are the plan's and the whole run's, within the
    call's own. A gc with nothing to do says nothing."""
    c = make_cache(CACHE_TTL="1s", CACHE_LEASE_TTL="1s", CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 10, age=5)
    c.add("b/workspace", 7, age=5)
    c.add("k/workspace", 3)
    c.add("r/r1", 2)
    c.index.add_lease(c.index.new_lease("r/r1", "r", "r1", ("r/r1",), now=time.time() - 5))

    def busy(tid: str) -> None:
        if tid == "b":
            raise LockTimeoutError("held by another process")

    c.on_lock = busy
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        report = collect_garbage(c)
    elapsed = time.perf_counter() - started
    assert sorted(p.key for p in report.evicted) == ["a/workspace", "r/r1"]
    assert [r.getMessage() for r in caplog.records] == [
        "gc: dropped 1 expired lease(s)",
        "gc: evicted 2 item(s), freed 12 bytes (indexed total 22 -> 10, limit 1000); skipped 1",
    ]
    assert 0 < report.plan_seconds < report.seconds <= elapsed
    assert c.index.all_leases() == []
    caplog.clear()
    c.on_lock = None
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        again = collect_garbage(c, dry_run=True)
    elapsed = time.perf_counter() - started
    assert [p.key for p in again.plan] == ["b/workspace"] and caplog.records == []
    assert 0 < again.plan_seconds <= again.seconds <= elapsed
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        collect_garbage(c)  # evictions alone are summed up too
    assert [r.getMessage() for r in caplog.records] == [
        "gc: evicted 1 item(s), freed 7 bytes (indexed total 10 -> 3, limit 1000); skipped 0"
    ]
    caplog.clear()
    c.settings = c.settings.with_(cache_ttl=3600.0)
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        assert collect_garbage(c).plan == []
    assert caplog.records == []  # nothing to do: nothing said


def test_a_dry_run_projects_the_indexed_total_after_the_plan(make_cache) -> None:
    """`cache gc --dry-run` reports the indexed total the plan would leave: every indexed kind
    it plans (shared, copy-on-write, run, stale row) counts, leftovers the index never counted
    do not; and the limit it planned against."""
    c = make_cache(CACHE_TTL="1h", CACHE_MAX_SIZE="5000")
    c.add("s/workspace", 1000, age=7200)  # shared, TTL
    c.add("c/shared", 200, age=7200)  # copy-on-write copy, TTL
    c.add("r/r1", 30)  # a run without a lease: an orphan
    c.index.publish(EntryRecord("g/workspace", "g", "shared", None, "shared", 4, 1, 0, 1))
    c.add("k/workspace", 500)  # kept
    stage = c.layout.tmp_dir / "k~shared~0123456789abcdef0123456789abcdef~abcd1234"
    stage.mkdir(parents=True)
    (stage / "part").write_bytes(b"x" * 60)  # a dead process's staging leftover: 60 bytes
    report = collect_garbage(c, dry_run=True)
    assert sorted((p.key, p.kind, p.bytes) for p in report.plan) == [
        (f".forgespace/tmp/{stage.name}", "staging", 60),
        ("c/shared", "cow-shared", 200),
        ("g/workspace", "stale-row", 4),
        ("r/r1", "run", 30),
        ("s/workspace", "shared", 1000),
    ]
    assert (report.total_before, report.total_after) == (1734, 500)
    assert report.dry_run is True and report.limit == 5000 and report.freed_bytes == 0
    # `--json` shows when each planned entry was last used, the stale row's too
    stale = [i for i in report.to_dict()["plan"] if i["kind"] == "stale-row"]
    assert [(i["key"], i["last_access"]) for i in stale] == [("g/workspace", 1.0)]


def test_plan_eviction_judges_ages_and_leases_at_the_time_it_is_given(make_cache) -> None:
    """plan_eviction(now=T) plans as gc would at T: an entry last used exactly CACHE_TTL
    before T is not expired yet, and a lease that has ended by T pins nothing."""
    from forgespace.cache.eviction import plan_eviction

    c = make_cache(CACHE_TTL="1h", CACHE_LEASE_TTL="1h")
    a = c.add("a/workspace", 10)
    b = c.add("b/workspace", 10)  # used after a
    c.index.add_lease(
        c.index.new_lease("b/workspace#r", "b", "r", ("b/workspace",), now=b.last_access)
    )
    assert plan_eviction(c, now=a.last_access + 3600) == ([], 20)
    plan, _ = plan_eviction(c, now=b.last_access + 7200)  # the lease ended an hour ago
    assert [(p.key, p.reason) for p in plan] == [("a/workspace", "ttl"), ("b/workspace", "ttl")]


def test_empty_target_dirs_go_whatever_the_others_among_them_are_doing(make_cache) -> None:
    """Among many target directories (in whatever order the cache directory lists them), every
    empty idle one goes; one that is busy, not empty, filled between the look and the lock, or
    already gone is left and stops nothing."""
    c = make_cache()
    kinds = ("e", "b", "f", "n", "v")  # empty, busy, full, filled meanwhile, vanishing
    for i in range(4):
        for kind in kinds:
            c.layout.target_dir(f"{kind}{i}").mkdir(parents=True)
            if kind == "f":
                (c.layout.target_dir(f"{kind}{i}") / "note").write_bytes(b"not gc's")
    vanished: list[str] = []

    def meanwhile(tid: str) -> None:
        if not vanished:  # the first lock: the other vanishing ones go (another gc)
            vanished.extend(f"v{i}" for i in range(4) if f"v{i}" != tid)
            for v in vanished:
                c.layout.target_dir(v).rmdir()
        if tid.startswith("b"):
            raise LockTimeoutError("held by another process")
        if tid.startswith("n"):
            (c.layout.target_dir(tid) / "r1").mkdir()  # a get_target got there first

    c.on_lock = meanwhile
    collect_garbage(c)
    left = sorted(p.name for p in c.layout.root.iterdir() if p.name != ".forgespace")
    assert left == sorted(f"{kind}{i}" for i in range(4) for kind in ("b", "f", "n"))


def test_gc_names_at_most_five_of_the_entries_it_indexes(make_cache, caplog) -> None:
    c = make_cache()
    tids = [f"t{i}" for i in range(6)]
    for tid in tids:
        c.add(f"{tid}/workspace", 1)
        c.index.remove(f"{tid}/workspace")
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        assert collect_garbage(c).adopted == [f"{tid}/workspace" for tid in tids]
    named = ", ".join(f"{tid}/workspace" for tid in tids[:5])
    assert [r.getMessage() for r in caplog.records] == [
        f"indexed 6 entries found on disk but missing from the index: {named}"
    ]


def test_gc_refreshes_the_cache_gauges(make_cache) -> None:
    """After a gc the scraped gauges show the cache as it left it: bytes, entries, limit."""
    c = make_cache(CACHE_TTL="1s", CACHE_MAX_SIZE="1000")
    c.add("a/workspace", 10, age=5)
    c.add("k/workspace", 3)
    for gauge in (metrics.CACHE_BYTES, metrics.CACHE_ENTRIES, metrics.CACHE_LIMIT_BYTES):
        gauge.set(-1)  # whatever an earlier test left there
    collect_garbage(c)
    assert metrics.value("forgespace_cache_bytes") == 3
    assert metrics.value("forgespace_cache_entries") == 1
    assert metrics.value("forgespace_cache_limit_bytes") == 1000


def test_gc_removes_unowned_overlay_layers_and_refuses_a_planted_overlay_dir(
    make_cache, tmp_path, caplog
) -> None:
    """Overlay upper/work directories no staging attempt or run owns go with gc, which says
    so; where a run planted a symlink instead of .forgespace/overlay, gc follows nothing,
    warns and still finishes."""
    c = make_cache()
    c.add("t/workspace", 10)
    layers = c.layout.overlay_dir / "t" / "r1" / "attempt"  # its run directory is gone
    (layers / "upper").mkdir(parents=True)
    (layers / "work").mkdir()
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        collect_garbage(c)
    assert not layers.exists()
    assert f"gc: removed 1 unowned overlay dir(s): {[layers]}" in [
        r.getMessage() for r in caplog.records
    ]
    caplog.clear()
    outside = tmp_path / "outside"
    (outside / "t" / "r2" / "attempt" / "upper").mkdir(parents=True)
    shutil.rmtree(c.layout.overlay_dir)
    c.layout.overlay_dir.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        collect_garbage(c)
    refusal = _planted_link_refusal(c.layout.overlay_dir, outside, prefix="gc: ")
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(refusal) for m in said), said
    assert (outside / "t" / "r2" / "attempt" / "upper").is_dir() and c.on_disk("t/workspace")


def test_gc_unmounts_no_other_file_system_than_its_own_overlays(make_cache, mounted) -> None:
    """A tmpfs (any mount but an overlay) is the operator's, even in a directory gc would
    unmount an overlay from: it is neither planned nor unmounted."""
    from forgespace.cache.overlay import mounts_under

    c = make_cache()
    c.add("t/shared", 10)
    stray = c.layout.target_dir("t") / "_old run" / "workspace"
    stray.mkdir(parents=True)
    mounted(stray)
    assert collect_garbage(c, dry_run=True).plan == []
    report = collect_garbage(c)
    assert report.evicted == [] and report.skipped == []
    assert mounts_under(c.layout.root) == [stray]


def test_a_dead_staging_directory_is_planned_with_its_own_bytes_and_target(
    make_cache, mounted
) -> None:
    """A staging directory a dead process left, with something still mounted in it (its
    owner died mid-way): planned as its target's leftover, sized without entering the mount."""
    c = make_cache()
    stage = c.layout.tmp_dir / "k~shared~0123456789abcdef0123456789abcdef~abcd1234"
    (stage / "workspace").mkdir(parents=True)
    (stage / "part").write_bytes(b"x" * 30)
    (mounted(stage / "workspace") / "big").write_bytes(b"y" * 1000)
    plan = collect_garbage(c, dry_run=True).plan
    assert [(p.key, p.target_id, p.kind, p.bytes) for p in plan] == [
        (f".forgespace/tmp/{stage.name}", "k", "staging", 30)
    ]


def test_gc_refuses_a_planted_staging_dir_and_says_so(make_cache, tmp_path, caplog) -> None:
    c = make_cache()
    c.add("t/workspace", 10)
    outside = tmp_path / "outside"
    (outside / "k~shared~0123456789abcdef0123456789abcdef~abcd1234").mkdir(parents=True)
    if c.layout.tmp_dir.exists():
        shutil.rmtree(c.layout.tmp_dir)
    c.layout.tmp_dir.symlink_to(outside)  # a run planted it
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        report = collect_garbage(c, dry_run=True)  # the plan alone: its own warning
    refusal = _planted_link_refusal(c.layout.tmp_dir, outside, prefix="gc: ")
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(refusal) for m in said), said
    assert report.plan == []
    collect_garbage(c)
    assert len(list(outside.iterdir())) == 1 and c.on_disk("t/workspace")


def test_a_trash_leftover_is_planned_with_its_own_bytes(make_cache, mounted) -> None:
    """Something left in .forgespace/trash (a gc killed mid-deletion) with a mount still in it
    is sized without entering the mount."""
    c = make_cache()
    left = c.layout.trash_dir / "t.r1~1-0123456789ab"
    (left / "workspace").mkdir(parents=True)
    (left / "f").write_bytes(b"x" * 20)
    (mounted(left / "workspace") / "big").write_bytes(b"y" * 1000)
    plan = collect_garbage(c, dry_run=True).plan
    assert [(p.key, p.kind, p.bytes) for p in plan] == [
        (f".forgespace/trash/{left.name}", "trash", 20)
    ]


def test_gc_warns_in_its_own_words_about_a_planted_trash(make_cache, tmp_path, caplog) -> None:
    c = make_cache()
    outside = tmp_path / "outside"
    (outside / "x~1").mkdir(parents=True)
    if c.layout.trash_dir.exists():
        c.layout.trash_dir.rmdir()
    c.layout.trash_dir.parent.mkdir(parents=True, exist_ok=True)
    c.layout.trash_dir.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="forgespace.cache.eviction"):
        report = collect_garbage(c, dry_run=True)
    refusal = _planted_link_refusal(c.layout.trash_dir, outside, prefix="gc: ")
    said = [r.getMessage() for r in caplog.records if r.name == "forgespace.cache.eviction"]
    assert any(m.startswith(refusal) for m in said), said
    assert report.plan == [] and (outside / "x~1").is_dir()


def test_gc_reaches_its_phases_in_order_plan_first(make_cache) -> None:
    """The seam race tests stop gc at: GC_PLANNED once, when the plan is made and nothing of
    it executed, then GC_VICTIM_CHECKED once per victim deleted."""
    c = make_cache(CACHE_TTL="1s")
    c.add("a/workspace", 10, age=5)
    c.add("b/r1", 10)  # no lease: an orphan
    seen: list[tuple[str, list[str]]] = []

    class Record:
        def reached(self, phase: object) -> None:
            there = [k for k in ("a/workspace", "b/r1") if c.on_disk(k)]
            seen.append((str(phase), there))

    c.hooks = Record()  # type: ignore[attr-defined]
    collect_garbage(c)
    assert seen == [
        ("gc-planned", ["a/workspace", "b/r1"]),
        ("gc-victim-checked", ["a/workspace", "b/r1"]),
        ("gc-victim-checked", ["a/workspace"]),
    ]


def test_gc_names_at_most_five_unowned_overlay_dirs_it_removes(make_cache, caplog) -> None:
    c = make_cache()
    dirs = [c.layout.overlay_dir / "t" / f"r{i}" / "attempt" for i in range(6)]
    for d in dirs:  # their run directories are gone
        (d / "upper").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="forgespace.cache.eviction"):
        collect_garbage(c)
    assert not any(d.exists() for d in dirs)
    said = [r.getMessage() for r in caplog.records if "unowned overlay" in r.getMessage()]
    assert said == [f"gc: removed 6 unowned overlay dir(s): {dirs[:5]}"]


def test_gc_completes_when_the_gauges_cannot_be_refreshed(make_cache, monkeypatch) -> None:
    """The gauges are best effort: a gc whose metrics update fails still evicts and reports."""
    c = make_cache(CACHE_TTL="1s")
    c.add("a/workspace", 10, age=5)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the metrics registry is unavailable")

    monkeypatch.setattr(metrics, "refresh_from_index", broken)
    assert [p.key for p in collect_garbage(c).evicted] == ["a/workspace"]
    assert not c.on_disk("a/workspace")
