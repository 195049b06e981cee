"""Clauses of the public contract (docs: the pinned contract) not pinned by other tests.

One test per clause; where a clause is already tested elsewhere it is not repeated here.
API calls run in-process; the CLI runs as a real process only where the CLI is the promise.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from support.objects import overwrite_keeping_metadata, put_foreign
from support.procs import make_project, tree_digest
from support.s3server import env_for

from forgespace import (
    ForgespaceError,
    Settings,
    TargetNotFoundError,
    UnsafeArchiveError,
    WorkspaceCache,
    open_store,
)
from forgespace.cache.staging import parse_staging_name, purpose_matches, staging_name
from forgespace.config import parse_duration, parse_size
from forgespace.errors import CleanupRefusedError, IntegrityError

pytestmark = pytest.mark.integration


FORGESPACE = str(Path(sys.executable).with_name("forgespace"))
MODES = ("isolated", "shared", "copy-on-write")
RUN_OF = {"isolated": "run-i", "shared": "run-s", "copy-on-write": "run-c"}


# --- helpers --------------------------------------------------------------------------------


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_nothing_left(cache: WorkspaceCache, target_id: str) -> None:
    """No entry, staging dir or lease of ``target_id`` survived a failed get_target."""
    assert not (cache.layout.root / target_id).exists()
    assert os.listdir(cache.layout.tmp_dir) == []
    assert [le for le in cache.index.live_leases() if le.target_id == target_id] == []
    assert cache.index.entries_of(target_id) == []


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env_for(settings), "FORGESPACE_LOG_LEVEL": "WARNING", "COLUMNS": "1000"}
    return subprocess.run([FORGESPACE, *args], env=env, capture_output=True, text=True, timeout=60)


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.01kB", 2010), ("2.03MB", 2_030_000), ("4.35GB", 4_350_000_000), ("2.5KiB", 2560)],
)
def test_parse_size_decimals_are_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("1.1m", 66.0), ("0.1h", 360.0), ("0.5d", 43200.0)])
def test_parse_duration_decimals_are_exact(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


def test_s3_bucket_defaults_to_targets(tmp_path: Path) -> None:
    assert Settings.from_env({"HOME": str(tmp_path)}).s3_bucket == "targets"


# --- Python API -----------------------------------------------------------------------------


def test_api_positional_and_keyword_forms(settings: Settings, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", files=4)
    tid = open_store(settings).upload_target(project)
    cache = WorkspaceCache(settings)  # opens the store from settings itself
    root = settings.cache_dir
    positional = cache.get_target(tid, "r1", "isolated")
    keyword = cache.get_target(target_id=tid, run_id="r2", workspace_isolation="isolated")
    default_mode = cache.get_target(tid, "r3")
    shared = cache.get_target(tid, workspace_isolation="shared")  # run_id optional for shared
    assert isinstance(positional, str) and isinstance(shared, str)
    assert positional == str(root / tid / "r1" / "workspace")
    assert keyword == str(root / tid / "r2" / "workspace")
    assert default_mode == str(root / tid / "r3" / "workspace")
    assert shared == str(root / tid / "workspace")
    cache.cleanup_cache(keyword, workspace_isolation="isolated")
    cache.cleanup_cache(positional, "isolated")
    cache.cleanup_cache(default_mode)
    assert not any((root / tid / r).exists() for r in ("r1", "r2", "r3"))
    cache.gc()
    assert Path(shared).is_dir()


def test_temporal_activities_have_the_contract_names_and_parameters() -> None:
    from temporalio.activity import _Definition

    from forgespace.temporal.activities import CacheActivities

    for name, params in (
        ("get_target", ["target_id", "run_id", "workspace_isolation"]),
        ("cleanup_cache", ["target_path", "workspace_isolation"]),
    ):
        fn = getattr(CacheActivities, name)
        defn = _Definition.from_callable(fn)
        assert defn is not None and defn.name == name
        assert list(inspect.signature(fn).parameters)[1 : 1 + len(params)] == params


# --- objects put by other clients, integrity ------------------------------------------------


FOREIGN = {
    "tar.gz": (tar_gz({"src/a.c": b"int a;\n", "README": b"hi\n"}), True),
    "zip": (zip_bytes({"src/a.c": b"int a;\n", "README": b"hi\n"}), True),
    "plain file": (b"\x7fELF not an archive\n" * 10, False),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_object_put_by_another_client_works_in_every_mode(
    any_store_settings: Settings, kind: str
) -> None:
    settings = any_store_settings
    data, is_archive = FOREIGN[kind]
    tid = f"foreign-{kind.replace(' ', '-')}"
    put_foreign(settings, tid, data)
    cache = WorkspaceCache(settings)
    root = settings.cache_dir
    for mode in MODES:
        rid = RUN_OF[mode]
        path = Path(cache.get_target(tid, rid, mode))
        if is_archive:
            expected = root / tid / ("workspace" if mode == "shared" else f"{rid}/workspace")
            assert path == expected
            assert files_under(path) == {"src/a.c": b"int a;\n", "README": b"hi\n"}
        else:
            expected = root / tid / ("target" if mode == "shared" else f"{rid}/target")
            assert path == expected and path.read_bytes() == data
    assert (root / tid / "shared" / "target").read_bytes() == data
    assert (root / tid / "target").read_bytes() == data


@pytest.mark.parametrize("mode", MODES)
def test_recorded_sha256_is_checked_by_get_target(
    any_store_settings: Settings, tmp_path: Path, mode: str
) -> None:
    settings = any_store_settings
    project = make_project(tmp_path / "project", files=6)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    size = cache.store.stat_target(tid).size
    # Same size, other bytes: only the recorded sha256 can tell.
    overwrite_keeping_metadata(settings, tid, bytes(size))
    with pytest.raises(IntegrityError, match="sha256") as ei:
        cache.get_target(tid, "r1", mode)
    assert isinstance(ei.value, ForgespaceError)
    assert_nothing_left(cache, tid)


@pytest.mark.parametrize("mode", MODES)
def test_missing_target_on_s3_is_target_not_found_and_leaves_nothing(
    s3_settings: Settings, mode: str
) -> None:
    cache = WorkspaceCache(s3_settings)
    with pytest.raises(TargetNotFoundError, match="no-such-target") as ei:
        cache.get_target("no-such-target", "r1", mode)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, ForgespaceError)
    assert_nothing_left(cache, "no-such-target")


# --- ids ------------------------------------------------------------------------------------


def test_ids_of_128_chars_accepted_and_129_refused(settings: Settings) -> None:
    cache = WorkspaceCache(settings)
    tid, rid = "t" * 128, "r" * 128
    put_foreign(settings, tid, b"payload")
    for mode in MODES:
        assert Path(cache.get_target(tid, rid, mode)).read_bytes() == b"payload"
    for bad_tid, bad_rid in ((tid + "x", "r1"), ("t1", rid + "x")):
        for mode in MODES:
            with pytest.raises(ValueError, match="1-128 characters") as ei:
                cache.get_target(bad_tid, bad_rid, mode)
            assert isinstance(ei.value, ForgespaceError)
    assert sorted(os.listdir(settings.cache_dir)) == sorted([".forgespace", tid])


def test_longest_ids_survive_cleanup_and_eviction(settings: Settings) -> None:
    # 128 + 128 characters do not fit in one file name (NAME_MAX 255): staging and trash
    # names built from both must stay below it.
    tid, rid = "t" * 128, "r" * 128
    put_foreign(settings, tid, tar_gz({"a.txt": b"a"}))
    cache = WorkspaceCache(settings.with_(cache_lease_ttl=0.0))
    cache.cleanup_cache(cache.get_target(tid, rid, "isolated"), "isolated")
    cache.get_target(tid, rid, "copy-on-write")  # its lease expires at once
    report = WorkspaceCache(settings.with_(cache_max_size=1)).gc()
    assert {e.key for e in report.evicted} == {f"{tid}/{rid}", f"{tid}/shared"}
    assert not (settings.cache_dir / tid).exists()
    assert os.listdir(cache.layout.trash_dir) == [] and os.listdir(cache.layout.tmp_dir) == []
    name = staging_name(tid, f"run-{rid}", "123456-abcdefabcdef", "0a1b2c3d")
    assert len(name) <= 200
    shown = parse_staging_name(name)
    assert shown is not None and shown[0] == tid and shown[2] == "123456-abcdefabcdef"
    assert purpose_matches(shown[1], f"run-{rid}")
    assert not purpose_matches(shown[1], f"run-{rid[:-1]}x")


@pytest.mark.parametrize("name", ["shared", "workspace", "target", ".forgespace"])
def test_reserved_names_refused_as_target_id_and_run_id(settings: Settings, name: str) -> None:
    cache = WorkspaceCache(settings)
    put_foreign(settings, "t1", b"payload")
    for mode in MODES:
        with pytest.raises(ValueError, match="target_id") as ei:
            cache.get_target(name, "r1", mode)
        assert isinstance(ei.value, ForgespaceError)
        with pytest.raises(ValueError, match="run_id"):
            cache.get_target("t1", name, mode)
    assert os.listdir(settings.cache_dir) == [".forgespace"]
    assert cache.index.live_leases() == []


# --- layout ---------------------------------------------------------------------------------


def test_copy_on_write_after_isolated_with_one_run_id_keeps_the_layout(
    settings: Settings, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", files=4)
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(project)
    root = settings.cache_dir
    paths = {mode: cache.get_target(tid, "run-1", mode) for mode in MODES}
    assert paths["isolated"] == paths["copy-on-write"] == str(root / tid / "run-1" / "workspace")
    assert paths["shared"] == str(root / tid / "workspace")
    for download in (root / tid / "run-1" / "target", root / tid / "target"):
        assert download.is_file()
    assert (root / tid / "shared" / "target").is_file()
    assert tree_digest(root / tid / "shared" / "workspace") == tree_digest(project)


# --- cleanup --------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [True, False], ids=["archive", "non-archive"])
def test_cleanup_refuses_a_run_directory_of_the_other_mode(
    settings: Settings, tmp_path: Path, archive: bool
) -> None:
    cache = WorkspaceCache(settings)
    if archive:
        tid = cache.store.upload_target(make_project(tmp_path / "project", files=4))
    else:
        (tmp_path / "tool").write_bytes(b"not an archive")
        tid = cache.store.upload_target(tmp_path / "tool")
    iso = cache.get_target(tid, "ri", "isolated")
    cow = cache.get_target(tid, "rc", "copy-on-write")
    for path, wrong, run in ((iso, "copy-on-write", "ri"), (cow, "isolated", "rc")):
        for p in (path, os.path.dirname(path)):
            with pytest.raises(CleanupRefusedError, match="nothing was deleted"):
                cache.cleanup_cache(p, workspace_isolation=wrong)
        assert Path(path).exists()
        assert cache.index.is_leased(f"{tid}/{run}")
    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    assert not (settings.cache_dir / tid / "ri").exists()
    assert not (settings.cache_dir / tid / "rc").exists()
    assert cache.index.live_leases() == []


def test_cleanup_with_an_unknown_mode_is_a_value_error_and_deletes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "project", files=3))
    ws = cache.get_target(tid, "r1", "isolated")
    with pytest.raises(ValueError, match="'cow'") as ei:
        cache.cleanup_cache(ws, workspace_isolation="cow")
    assert isinstance(ei.value, ForgespaceError)
    assert Path(ws).is_dir() and cache.index.is_leased(f"{tid}/r1")


def test_cleanup_accepts_the_target_path_of_a_non_archive_target(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "tool").write_bytes(b"\x00\x01 not an archive")
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(tmp_path / "tool")
    root = settings.cache_dir
    shared = cache.get_target(tid, "rs", "shared")
    iso = cache.get_target(tid, "ri", "isolated")
    cow = cache.get_target(tid, "rc", "copy-on-write")
    assert iso.endswith("/ri/target") and cow.endswith("/rc/target")
    cache.cleanup_cache(iso, "isolated")
    cache.cleanup_cache(cow, "copy-on-write")
    cache.cleanup_cache(shared, "shared")
    assert not (root / tid / "ri").exists() and not (root / tid / "rc").exists()
    assert (root / tid / "shared" / "target").is_file()  # copy-on-write keeps shared/
    assert Path(shared).read_bytes() == b"\x00\x01 not an archive"  # shared removes nothing
    assert cache.index.live_leases() == []


# --- archives -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_archive_extracting_past_cache_max_size_is_refused(settings: Settings, mode: str) -> None:
    small = settings.with_(cache_max_size=parse_size("100kB"))
    cache = WorkspaceCache(small)
    put_foreign(small, "bomb", tar_gz({"zeros": bytes(300_000)}))
    assert (small.storage_dir / "bomb" / "target").stat().st_size < 100_000
    with pytest.raises(UnsafeArchiveError):
        cache.get_target("bomb", "r1", mode)
    assert_nothing_left(cache, "bomb")


# --- CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cli_get_of_a_missing_target_fails_clearly_and_leaves_nothing(
    settings: Settings, mode: str
) -> None:
    proc = cli(settings, "get", "no-such-target", "--run-id", "r1", "--isolation", mode)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "no-such-target" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    cache = WorkspaceCache(settings)
    assert_nothing_left(cache, "no-such-target")


def test_cli_get_prints_the_path_alone_on_the_last_line(settings: Settings, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", files=3)
    (tmp_path / "tool").write_bytes(b"tool")
    store = open_store(settings)
    tid, fid = store.upload_target(project), store.upload_target(tmp_path / "tool")
    root = settings.cache_dir
    cases = [
        (["get", tid, "--isolation", "shared"], root / tid / "workspace"),
        (["get", tid, "--run-id", "r1"], root / tid / "r1" / "workspace"),  # default isolated
        (
            ["get", fid, "--run-id", "r2", "--isolation", "copy-on-write"],
            root / fid / "r2" / "target",
        ),
    ]
    for args, expected in cases:
        proc = cli(settings, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == str(expected)
    done = cli(
        settings, "cleanup", str(root / fid / "r2" / "target"), "--isolation", "copy-on-write"
    )
    assert done.returncode == 0, done.stderr
    assert not (root / fid / "r2").exists() and (root / fid / "shared" / "target").is_file()


@pytest.mark.parametrize("command", ["get", "cleanup"])
def test_cli_rejects_an_unknown_isolation_mode(
    settings: Settings, tmp_path: Path, command: str
) -> None:
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "project", files=3))
    ws = cache.get_target(tid, "r1", "isolated")
    arg = tid if command == "get" else ws
    proc = cli(settings, command, arg, "--run-id", "r1", "--isolation", "cow")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "'cow'" in proc.stderr
    assert all(m in proc.stderr for m in MODES)
    assert Path(ws).is_dir() and cache.index.is_leased(f"{tid}/r1")


def test_cli_cache_evict_of_an_unknown_id(settings: Settings, tmp_path: Path) -> None:
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(tmp_path / "project", files=3))
    ws = cache.get_target(tid, None, "shared")
    unknown = cli(settings, "cache", "evict", "never-cached")
    assert unknown.returncode == 0, unknown.stderr
    assert "nothing indexed for target never-cached" in unknown.stderr
    invalid = cli(settings, "cache", "evict", "../etc")
    assert invalid.returncode == 2 and "invalid target_id '../etc'" in invalid.stderr
    assert Path(ws).is_dir() and cache.index.entries_of(tid) != []


def test_cli_run_json_with_an_isolation_override_sums_each_runs_downloads(
    settings: Settings, tmp_path: Path
) -> None:
    from support.temporal import FIXTURE_WORKFLOWS

    project = make_project(tmp_path / "project", files=3)
    env = {**env_for(settings), "FORGESPACE_LOG_LEVEL": "WARNING", "COLUMNS": "1000"}
    env.pop("TEMPORAL_ADDRESS", None)  # the embedded dev server
    args = ["run", "fs_marker_shared", str(project), "--runs", "2", "--isolation", "isolated"]
    args += ["--json", "--workflows-dir", str(FIXTURE_WORKFLOWS), "--no-bundled"]
    proc = subprocess.run([FORGESPACE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert report["workspace_isolation"] == "isolated"
    tid = report["target_id"]
    assert [r["status"] for r in report["runs"]] == ["completed", "completed"]
    for r in report["runs"]:
        assert r["workspace"] == str(settings.cache_dir / tid / r["run_id"] / "workspace")
        assert r["error"] is None and isinstance(r["findings"], int)
    assert report["cache"] == {"downloads": 2, "hits": 0}  # isolated: one download per run


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["get", "t1", "--run-id", "r1", "--isolation", "cow"],
            "invalid workspace_isolation 'cow'",
        ),
        (["get", "a/b", "--run-id", "r1"], "invalid target_id 'a/b'"),
        (["get", "t1", "--run-id", "shared"], "invalid run_id 'shared'"),
        # (a missing --run-id is no longer bad input: `get` makes one up and prints it; see
        # test_cache_cli.test_get_without_run_id_makes_one_and_cleanup_infers_the_mode)
        (["get", "t1", "--run-id", "r\n1"], "invalid run_id 'r\\n1'"),
        (["cleanup", "/tmp", "--isolation", "Shared"], "invalid workspace_isolation 'Shared'"),
    ],
)
def test_cli_bad_input_is_refused_before_anything_is_created(
    settings: Settings, args: list[str], needle: str
) -> None:
    proc = cli(settings, *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and proc.stdout == ""
    assert not settings.cache_dir.exists()
