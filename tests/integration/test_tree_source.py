"""A sealed tree as the worker's only copy of its blobs (btrfs, cache/treesource.py): a shared
get writes no local pack, and a later isolated or copy-on-write build of the same content copies
from the sealed tree instead of fetching; a tree a run tampered with (the attacks themselves),
or one changed while it is copied, is never used: its blobs are fetched again. SIGKILL during
such a get leaves nothing."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support.procs import make_project, start_role, tree_digest, wait_for

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache import blobstore, treesource

pytestmark = [pytest.mark.integration, pytest.mark.btrfs]

COPIED = "copied from the sealed tree"
NOT_USED = "not used"


@pytest.fixture
def world(btrfs_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A cache and a local store on the btrfs mount; one manifest target uploaded."""
    base = Path(tempfile.mkdtemp(prefix="holder-", dir=btrfs_dir))
    env = {"CACHE_DIR": str(base / "cache"), "STORAGE_DIR": str(base / "store")}
    settings = Settings.from_env(env)
    store = open_store(settings)
    src = tmp_path / "src"
    make_project(src, files=60, size=5000, seed="holder")
    (src / "same_a.txt").write_text("one blob, two files\n" * 50)
    (src / "same_b.txt").write_text("one blob, two files\n" * 50)
    os.symlink("pkg0/sub0/f0.py", src / "link.py")
    tid = store.upload_target(src)
    cache = WorkspaceCache(settings, store=store)
    return {"base": base, "env": env, "src": src, "tid": tid, "cache": cache}


def _packs(cache: WorkspaceCache) -> list[str]:
    blob_dir = cache.layout.meta_dir / "blobs"
    return sorted(p.name for p in blob_dir.glob("*.pack")) if blob_dir.exists() else []


def _blob_fetches(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Blobs each later fetch of the world's store asks for (an isolated run still downloads
    its target's manifest: only blob fetches say whether a tree served the build)."""
    store, asked = world["cache"].store, []
    real = store.fetch_blobs

    def fetch(files: Any, sink: Any) -> int:
        files = list(files)
        asked.append(len(files))
        return real(files, sink)  # type: ignore[no-any-return]

    monkeypatch.setattr(store, "fetch_blobs", fetch)
    return asked


def test_a_shared_tree_is_the_only_copy_and_serves_isolated_and_cow_runs(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache, tid, src = world["cache"], world["tid"], world["src"]
    ws = Path(cache.get_target(tid, None, "shared"))
    assert tree_digest(ws) == tree_digest(src)
    assert _packs(cache) == []  # the sealed tree holds the blobs: no second copy
    asked = _blob_fetches(world, monkeypatch)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    run = Path(cache.get_target(tid, "r1", "isolated"))
    assert tree_digest(run) == tree_digest(src)
    (run / "pkg0" / "sub0" / "f0.py").write_text("a run writes its own copy")
    assert tree_digest(ws) == tree_digest(src)  # never written through
    # copy-on-write's pristine tree: built under the target's exclusive lock, from the tree
    # the same target holds shared (its lock is not taken twice)
    cow = Path(cache.get_target(tid, "r2", "copy-on-write"))
    assert tree_digest(cow) == tree_digest(src)
    assert asked == []  # neither build fetched a blob
    assert sum(COPIED in r.getMessage() for r in caplog.records) == 2, caplog.text


def _modify_file(ws: Path, outside: Path) -> None:
    f = ws / "pkg1" / "sub1" / "f1.py"
    os.chmod(f, 0o644)
    f.write_text("planted by a run")
    os.chmod(f, 0o444)


def _chmod_only(ws: Path, outside: Path) -> None:
    os.chmod(ws / "pkg1" / "sub1" / "f1.py", 0o444)  # same mode: only its ctime moves


def _dir_to_symlink(ws: Path, outside: Path) -> None:
    """A directory replaced by a symlink to a copy of it outside CACHE_DIR."""
    parent = ws / "pkg1"
    os.chmod(parent, 0o755)
    shutil.copytree(parent / "sub1", outside / "sub1")
    os.chmod(parent / "sub1", 0o755)
    shutil.rmtree(parent / "sub1")
    os.symlink(outside / "sub1", parent / "sub1")
    os.chmod(parent, 0o555)


ATTACKS = {"modified-file": _modify_file, "ctime-only": _chmod_only, "symlink": _dir_to_symlink}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_tampered_tree_is_never_copied_from(
    world: dict[str, Any],
    attack: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, tid, src = world["cache"], world["tid"], world["src"]
    ws = Path(cache.get_target(tid, None, "shared"))
    outside = tmp_path / "outside"
    outside.mkdir()
    ATTACKS[attack](ws, outside)
    before = tree_digest(outside)
    asked = _blob_fetches(world, monkeypatch)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    run = Path(cache.get_target(tid, "r1", "isolated"))
    assert tree_digest(run) == tree_digest(src)
    messages = [r.getMessage() for r in caplog.records]
    assert any(NOT_USED in m and "sealed tree" in m for m in messages), messages
    assert not any(COPIED in m for m in messages), messages
    assert asked and asked[0] > 0  # fetched again from the store
    assert tree_digest(outside) == before  # nothing outside CACHE_DIR touched


def test_a_tree_changed_while_copied_is_dropped_and_its_blobs_fetched(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The change happens after the tree was verified, between opening a file and the check
    after its copy: the build starts over without the tree."""
    cache, tid, src = world["cache"], world["tid"], world["src"]
    ws = Path(cache.get_target(tid, None, "shared"))
    real = treesource.Holder.open_file
    changed: list[str] = []

    def open_then_change(self: treesource.Holder, digest: str) -> Any:
        out = real(self, digest)
        if not changed:
            rel = self.files[digest]
            os.chmod(ws / rel, os.stat(ws / rel).st_mode & 0o777)  # ctime moves
            changed.append(rel)
        return out

    monkeypatch.setattr(treesource.Holder, "open_file", open_then_change)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    asked = _blob_fetches(world, monkeypatch)
    run = Path(cache.get_target(tid, "r1", "isolated"))
    assert changed
    assert tree_digest(run) == tree_digest(src)
    assert any("modified while copied" in r.getMessage() for r in caplog.records), caplog.text
    assert asked and asked[0] > 0


def test_a_removed_tree_leaves_its_blobs_to_the_store(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc removed the shared tree (and with it the only local copy): the next build fetches."""
    from forgespace.cache.eviction import evict_target

    cache, tid, src = world["cache"], world["tid"], world["src"]
    cache.get_target(tid, None, "shared")
    evict_target(cache, tid)
    asked = _blob_fetches(world, monkeypatch)
    run = Path(cache.get_target(tid, "r1", "isolated"))
    assert tree_digest(run) == tree_digest(src)
    assert asked and asked[0] > 0
    assert _packs(cache)  # an isolated build keeps its blobs in a local pack


def test_sigkill_during_a_memory_first_get_leaves_nothing(
    world: dict[str, Any], tmp_path: Path
) -> None:
    cache, tid, src = world["cache"], world["tid"], world["src"]
    sig = tmp_path / "paused"
    env = {**os.environ, **world["env"]}
    spec = {"target_id": tid, "mode": "shared", "pause": "blob-write", "signal": str(sig)}
    proc = start_role("incremental", "get", spec, env)
    try:
        wait_for(lambda: sig.exists() or proc.poll() is not None, 120, "the pause point")
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not cache.layout.shared_workspace(tid).exists()
    ws = Path(cache.get_target(tid, None, "shared"))
    assert tree_digest(ws) == tree_digest(src)
    blob_dir = cache.layout.meta_dir / "blobs"
    blobstore.sweep(cache._modes)  # the dead get's temp pack goes
    assert [p.name for p in blob_dir.iterdir()] == []


def test_a_file_swapped_for_a_symlink_before_its_open_is_not_followed(
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The race between the check of a name and its open: the file becomes a symlink to a
    FIFO outside CACHE_DIR, which a writer waits on, right after ``fstatat`` found it sealed.
    The open does not follow it (the writer is never released), the tree is dropped and the
    build is exact from the store."""
    import threading

    cache, tid, src = world["cache"], world["tid"], world["src"]
    ws = Path(cache.get_target(tid, None, "shared"))
    secret = tmp_path / "fifo"
    os.mkfifo(secret)
    released = threading.Event()

    def writer() -> None:
        os.close(os.open(secret, os.O_WRONLY))  # returns once someone opens it to read
        released.set()

    threading.Thread(target=writer, daemon=True).start()
    real_stat = os.stat
    swapped: list[Path] = []

    def stat_then_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        dir_fd = kwargs.get("dir_fd")
        if dir_fd is not None and not swapped and str(path).endswith(".py"):
            parent = Path(os.readlink(f"/proc/self/fd/{dir_fd}"))
            if parent.is_relative_to(ws):  # the holder's file, just found sealed
                os.chmod(parent, 0o755)
                os.rename(parent / path, parent / "moved-away")
                os.symlink(secret, parent / path)
                swapped.append((parent / path).relative_to(ws))
        return st

    monkeypatch.setattr(os, "stat", stat_then_swap)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    run = Path(cache.get_target(tid, "r1", "isolated"))
    monkeypatch.undo()
    assert swapped
    assert tree_digest(run) == tree_digest(src)
    assert (run / swapped[0]).read_bytes() == (src / swapped[0]).read_bytes()
    assert any(
        str(swapped[0]) in r.getMessage() and NOT_USED in r.getMessage() for r in caplog.records
    ), caplog.text
    followed = released.wait(2)  # an open of the FIFO would have released the writer at once
    if not followed:
        os.close(os.open(secret, os.O_RDONLY | os.O_NONBLOCK))  # release it: the test is done
    assert not followed, "the symlink to the FIFO outside CACHE_DIR was followed"


def test_a_seal_naming_a_blob_of_another_size_drops_the_tree(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A forged seal files one file under the digest of a file of another size: its size
    does not match the manifest's, the tree is dropped and the build is exact."""
    from forgespace.cache import snapshot
    from forgespace.cache.manifest import seal_path

    cache, tid, src = world["cache"], world["tid"], world["src"]
    cache.get_target(tid, None, "shared")
    sp = seal_path(cache.layout.meta_dir, tid, "shared")
    seal = snapshot.SealRecord.decode(sp.read_bytes())
    files = [(rel, e) for rel, e in seal.entries.items() if e[0] == "f"]
    (a_rel, a), (_b_rel, b) = next(
        (x, y) for i, x in enumerate(files) for y in files[i + 1 :] if x[1][4] != y[1][4]
    )
    seal.entries[a_rel] = (*a[:6], b[6], a[7])  # a's file, filed under b's digest
    forged = sp.with_name("forged")  # a new file: the process read the old one
    forged.write_bytes(snapshot.SealRecord(seal.uuid, seal.entries).encode())
    forged.rename(sp)
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    run = Path(cache.get_target(tid, "r1", "isolated"))
    assert tree_digest(run) == tree_digest(src)
    assert any(f"{a_rel!r} has {a[4]} bytes" in r.getMessage() for r in caplog.records), caplog.text
