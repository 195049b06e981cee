"""The local store's lifecycle: listing, pruning by age of last upload, its own leftovers."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgespace.storage.lifecycle import StoredObject, plan_prune
from forgespace.storage.local import LocalStore

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _age(path: Path, seconds: float) -> None:
    """Make ``path`` look last written ``seconds`` ago."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _plan(store: LocalStore, targets: float | None = 7 * DAY, results: float | None = 30 * DAY):
    return plan_prune(store, target_ttl=targets, result_ttl=results, temp_grace=3600.0)


def test_ls_lists_targets_and_results_but_no_bookkeeping(store: LocalStore, tmp_path: Path) -> None:
    a = store.upload_target(_file(tmp_path, b"a" * 10, "a"))
    b = store.upload_target(_file(tmp_path, b"b" * 20, "b"), target_id="my-id")
    foreign = store.root / "foreign" / "target"  # dropped there by another tool: no sidecar
    foreign.parent.mkdir()
    foreign.write_bytes(b"xyz")
    store.put_result("wf-1/results.json", b"{}")
    (store.root / ".upload-0123.tmp").write_bytes(b"junk")
    (store.root / "not a valid id").mkdir()
    targets = {o.key: o for o in store.list_targets()}
    assert sorted(targets) == sorted([a, b, "foreign"])
    assert (targets[a].size, targets["my-id"].size, targets["foreign"].size) == (10, 20, 3)
    assert targets[a].sha256 is not None and targets["foreign"].sha256 is None
    assert [(o.key, o.size) for o in store.list_results()] == [("wf-1/results.json", 2)]


def test_reupload_restarts_the_age_and_prune_keeps_it(store: LocalStore, tmp_path: Path) -> None:
    src = _file(tmp_path, b"payload")
    tid = store.upload_target(src)
    obj = store.object_path(tid)
    _age(obj, 10 * DAY)
    assert [o.key for o in _plan(store).targets] == [tid]
    assert store.upload_target(src) == tid  # same content: nothing written, age restarted
    assert _plan(store).targets == ()
    assert obj.read_bytes() == b"payload"


def test_prune_removes_old_targets_and_results_only(store: LocalStore, tmp_path: Path) -> None:
    old = store.upload_target(_file(tmp_path, b"old", "o"))
    young = store.upload_target(_file(tmp_path, b"young", "y"))
    _age(store.object_path(old), 8 * DAY)
    old_result = Path(store.put_result("wf-old/results.json", b"{}"))
    young_result = Path(store.put_result("wf-new/results.sarif", b"{}"))
    _age(old_result, 31 * DAY)
    _age(young_result, 8 * DAY)  # older than the target limit, younger than the result one
    plan = _plan(store)
    assert [o.key for o in plan.objects] == [old, "wf-old/results.json"]
    assert plan.expected_freed_bytes == 3 + 2
    result = plan.execute(store)
    assert (len(result.deleted), result.kept, result.freed_bytes) == (2, (), 5)
    assert [o.key for o in store.list_targets()] == [young]
    assert [o.key for o in store.list_results()] == ["wf-new/results.sarif"]
    assert not (store.root / old).exists()
    assert not old_result.parent.exists()  # its emptied directory went with it


def test_prune_with_no_limit_for_a_kind_leaves_that_kind(store: LocalStore, tmp_path: Path) -> None:
    tid = store.upload_target(_file(tmp_path, b"x"))
    _age(store.object_path(tid), 100 * DAY)
    _age(Path(store.put_result("wf/results.json", b"{}")), 100 * DAY)
    assert [o.kind for o in _plan(store, targets=None).objects] == ["result"]
    assert [o.kind for o in _plan(store, results=None).objects] == ["target"]


def test_a_target_uploaded_again_after_the_plan_is_kept(store: LocalStore, tmp_path: Path) -> None:
    src = _file(tmp_path, b"still wanted")
    tid = store.upload_target(src)
    _age(store.object_path(tid), 10 * DAY)
    plan = _plan(store)
    assert [o.key for o in plan.targets] == [tid]
    store.upload_target(src)  # between the plan and its execution
    result = plan.execute(store)
    assert ([o.key for o in result.kept], result.deleted) == ([tid], ())
    assert store.object_path(tid).read_bytes() == b"still wanted"


def test_prune_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "never-created")
    plan = _plan(store, targets=0, results=0)
    assert plan.objects == () and plan.execute(store).deleted == ()
    assert not store.root.exists()


# --- leftovers --------------------------------------------------------------------------
def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process that holds ``path``'s flock, as a live upload holds its temp file."""
    code = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'ab')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_dead_upload_temp_files_go_live_and_young_ones_stay(
    store: LocalStore, tmp_path: Path
) -> None:
    tid = store.upload_target(_file(tmp_path, b"x"))
    dead = store.root / ".upload-dead.tmp"
    young = store.root / ".upload-young.tmp"
    live = store.root / ".upload-live.tmp"
    sidecar_tmp = store.root / tid / ".target.meta.json.tmp-abc"
    result_tmp = store.root / ".results" / "wf" / ".results.json.tmp-abc"
    result_tmp.parent.mkdir(parents=True)
    for p in (dead, young, live, sidecar_tmp, result_tmp):
        p.write_bytes(b"partial")
    holder = _hold_lock(live)
    try:
        for p in (dead, live, sidecar_tmp, result_tmp):
            _age(p, 2 * 3600)
        old_lock = store.root / ".locks" / f"{tid}.lock"
        _age(old_lock, 365 * DAY)
        plan = _plan(store)
        expected = sorted(
            p.relative_to(store.root).as_posix() for p in (dead, sidecar_tmp, result_tmp)
        )
        assert [o.key for o in plan.leftovers] == expected
        assert len(plan.execute(store).deleted) == 3
        assert not dead.exists() and not sidecar_tmp.exists() and not result_tmp.exists()
        assert young.exists() and live.exists() and old_lock.exists()
        assert store.list_targets()[0].key == tid  # the target itself untouched
    finally:
        holder.kill()
        holder.wait()
    # once its holder is gone, the old temp file is a dead upload's
    assert [o.key for o in _plan(store).leftovers] == [".upload-live.tmp"]


def test_an_upload_holds_its_temp_file_until_published(store: LocalStore, tmp_path: Path) -> None:
    """The lock prune relies on is really held by upload_target while it writes."""
    seen: list[bool] = []

    def progress(done: int, total: int) -> None:
        if seen:
            return
        (tmp,) = store.root.glob(".upload-*.tmp")
        _age(tmp, 10 * 3600)  # however old it looks
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)
        finally:
            os.close(fd)
        assert _plan(store).leftovers == ()

    store.upload_target(_file(tmp_path, os.urandom(3 << 20)), progress=progress)
    assert seen == [True]
    assert list(store.root.glob(".upload-*.tmp")) == []


def test_remove_leftover_refuses_what_is_not_one(store: LocalStore) -> None:
    lock = StoredObject("leftover", ".locks/x.lock", 0, 0.0)
    with pytest.raises(ValueError, match="not a leftover"):
        store.remove_leftover(lock, 0.0)
    with pytest.raises(ValueError, match="not a leftover"):
        store.remove_leftover(StoredObject("leftover", "../elsewhere", 0, 0.0), 0.0)
