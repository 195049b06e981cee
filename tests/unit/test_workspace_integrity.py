"""Protected shared workspaces (O(1) stamp on a hit, full verify on demand, repair from the
cached target) and removal of leftovers of dead processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import make_project, tree_digest

from forgespace.cache import fsops
from forgespace.cache.staging import OwnerToken, staging_name
from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", files=20)


@pytest.fixture
def cache(settings: Settings) -> WorkspaceCache:
    return WorkspaceCache(settings)


def test_top_level_tamper_detected_on_hit_and_repaired_without_download(
    cache: WorkspaceCache, project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, "r1", "shared"))
    os.chmod(ws, 0o755)  # what a misconfigured run running as root could do
    (ws / "dropped-by-run").write_text("x")
    caplog.set_level(logging.INFO, logger="forgespace.cache")
    again = cache.get_target_report(tid, "r9", "shared")
    assert again.path == str(ws) and not again.downloaded
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("r9" in m and "modified" in m for m in warnings), warnings
    assert not (ws / "dropped-by-run").exists()
    assert tree_digest(ws) == tree_digest(project)
    assert (os.stat(ws).st_mode & 0o777) == 0o555
    assert cache.index.counters().get("downloads") == 1, "repaired from the cached target"
    assert cache.verify_shared(tid) == []


def test_deep_change_found_by_verify_and_repaired(cache: WorkspaceCache, project: Path) -> None:
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, None, "shared"))
    cow_ws = Path(cache.get_target(tid, "c1", "copy-on-write")).parents[1] / "shared" / "workspace"
    assert cache.verify_shared(tid) == []
    deep = ws / "pkg3" / "sub0" / "f3.py"
    os.chmod(deep, 0o644)
    deep.write_text("tampered, different size")
    os.chmod(cow_ws / "pkg0" / "sub0", 0o755)  # what a run owning the files can do (and root)
    (cow_ws / "pkg0" / "sub0" / "f0.py").unlink()
    diffs = cache.verify_shared(tid)
    assert f"{tid}/workspace: modified: pkg3/sub0/f3.py (size 200 -> 24)" in diffs
    assert f"{tid}/workspace: writable: pkg3/sub0/f3.py" in diffs
    assert f"{tid}/shared/workspace: missing: pkg0/sub0/f0.py" in diffs
    # the documented limit: a deep rewrite is not checked on the hit path (O(1) there)
    assert cache.get_target(tid, "r2", "shared") == str(ws)
    assert cache.repair_shared(tid)
    assert tree_digest(ws) == tree_digest(project)
    assert not [d for d in cache.verify_shared(tid) if d.startswith(f"{tid}/workspace")]


def test_target_without_workspace_is_re_extracted_not_downloaded(
    cache: WorkspaceCache, project: Path
) -> None:
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, None, "shared"))
    # the state a crash between the two renames (or a half-done eviction) leaves
    fsops.discard(cache.layout.root, ws)
    assert (cache.layout.root / tid / "target").exists()
    res = cache.get_target_report(tid, None, "shared")
    assert res.path == str(ws) and not res.downloaded
    assert tree_digest(ws) == tree_digest(project)
    assert cache.index.counters().get("downloads") == 1


STAGER = """
import sys, time
from pathlib import Path
from forgespace.cache.staging import OwnerToken, staging_name
tmp, owners, tid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tok = OwnerToken.for_dir(owners).token
d = tmp / staging_name(tid, "shared", tok, "deadbeef")
(d / "workspace" / "half").mkdir(parents=True)
(d / "target").write_bytes(b"partial")
print(d, flush=True)
time.sleep(60)
"""


def test_dead_processes_staging_removed_by_next_get_live_one_kept(
    cache: WorkspaceCache, project: Path
) -> None:
    tid = cache.store.upload_target(project)
    owners = cache.layout.meta_dir / "owners"
    p = subprocess.Popen(
        [sys.executable, "-c", STAGER, str(cache.layout.tmp_dir), str(owners), tid],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    dead_stage = Path(p.stdout.readline().strip())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # a staging dir of a live owner (this process) for the same target must survive
    live_stage = cache.layout.tmp_dir / staging_name(
        tid, "run-x", OwnerToken.for_dir(owners).token, "cafecafe"
    )
    live_stage.mkdir()
    assert dead_stage.exists()
    res = cache.get_target_report(tid, None, "shared")
    assert res.downloaded
    assert not dead_stage.exists()
    assert live_stage.exists()
    assert tree_digest(Path(res.path)) == tree_digest(project)
    live_stage.rmdir()
    removed = cache.sweep_leftovers()
    assert os.listdir(cache.layout.tmp_dir) == []
    assert os.listdir(cache.layout.trash_dir) == []
    assert not any(str(p.pid) == f.name.split("-")[0] for f in owners.iterdir()), removed


def test_missing_stamp_is_recorded_by_the_next_hit(cache: WorkspaceCache, project: Path) -> None:
    from forgespace.cache import manifest as mf

    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, None, "shared"))
    stamp = mf.stamp_path(cache.layout.meta_dir, tid, "shared")
    stamp.unlink()  # as if the publisher was killed right after its last rename
    assert cache.get_target(tid, "a", "shared") == str(ws)
    assert stamp.exists()
    os.chmod(ws, 0o755)
    (ws / "added").write_text("x")
    cache.get_target(tid, "b", "shared")
    assert not (ws / "added").exists(), "tamper detection works again"


def test_added_files_special_files_and_same_size_rewrites_are_found(
    cache: WorkspaceCache, project: Path
) -> None:
    tid = cache.store.upload_target(project)
    ws = Path(cache.get_target(tid, None, "shared"))
    os.chmod(ws, 0o755)  # root can write anyway; the mode change is reported too
    (ws / "dropped.txt").write_text("x")
    os.mkfifo(ws / "pipe")
    (ws / "link").symlink_to("run.sh")  # links are not files the manifest lists: not reported
    same = ws / "pkg0" / "sub0" / "f0.py"
    before = same.stat()
    os.utime(same, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    diffs = cache.verify_shared(tid)
    assert sorted(diffs) == sorted(
        f"{tid}/workspace: {d}"
        for d in (
            "writable: ./",
            "added: dropped.txt",
            "added: pipe (not a regular file)",
            "modified: pkg0/sub0/f0.py (mtime changed)",
        )
    )


def test_repair_drops_a_modified_copy_on_write_copy_and_the_next_run_downloads_it(
    cache: WorkspaceCache, project: Path
) -> None:
    from forgespace.cache.verify import verify_cache

    tid = cache.store.upload_target(project)
    run_ws = cache.get_target(tid, "c1", "copy-on-write")
    cache.cleanup_cache(run_ws, "copy-on-write")
    shared_ws = cache.layout.root / tid / "shared" / "workspace"
    victim = shared_ws / "pkg1" / "sub1" / "f1.py"
    os.chmod(victim, 0o644)
    victim.write_text("tampered")
    report = verify_cache(cache, repair=True)
    assert report.modified[tid] == [
        f"{tid}/shared/workspace: modified: pkg1/sub1/f1.py (size 200 -> 8)",
        f"{tid}/shared/workspace: writable: pkg1/sub1/f1.py",
    ]
    # There is no pristine copy beside it to repair from: it goes, and nothing else was wrong.
    assert report.repaired == [f"{tid}/shared removed (modified); the next run re-downloads"]
    assert not (cache.layout.root / tid / "shared").exists()
    again = cache.get_target_report(tid, "c2", "copy-on-write")
    assert again.downloaded
    assert tree_digest(Path(again.path)) == tree_digest(project)
    assert verify_cache(cache, repair=False).modified == {}


def test_a_manifest_of_another_version_is_no_manifest_and_repair_records_one(
    cache: WorkspaceCache, project: Path
) -> None:
    from forgespace.cache.manifest import manifest_path

    tid = cache.store.upload_target(project)
    cache.get_target(tid, None, "shared")
    manifest = manifest_path(cache.layout.meta_dir, tid, "shared")
    manifest.write_text('{"version": 999, "files": []}')
    assert cache.verify_shared(tid) == [f"{tid}/workspace: no manifest recorded"]
    assert cache.repair_shared(tid)
    assert cache.verify_shared(tid) == []
