"""The index's create/rebuild lock is locks.flock: a bounded wait whose error names the index
and who holds the lock, across real processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from forgespace.cache import index as index_mod
from forgespace.cache.index import CacheIndex
from forgespace.cache.locks import flock
from forgespace.errors import LockTimeoutError
from forgespace.layout import CacheLayout


def _hold(root: str, ready: mp.synchronize.Event, done: mp.synchronize.Event) -> None:
    layout = CacheLayout(Path(root))
    with flock(layout.meta_dir / "index.lock", purpose="test holder", root=layout.root):
        ready.set()
        done.wait(30)


def test_a_held_rebuild_lock_times_out_naming_the_index_and_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = CacheLayout(tmp_path / "cache")
    idx = CacheIndex(layout, lease_ttl=60)
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(layout.root), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        monkeypatch.setattr(index_mod, "REBUILD_LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(LockTimeoutError) as err, idx._rebuild_flock():
            pass
        assert str(idx.path) in str(err.value)
        assert "rebuilding" in str(err.value)
        assert f"pid {holder.pid}" in str(err.value)
        assert err.value.lock_path == str(layout.meta_dir / "index.lock")
    finally:
        done.set()
        holder.join(30)
    with idx._rebuild_flock():  # released when its holder left
        pass
