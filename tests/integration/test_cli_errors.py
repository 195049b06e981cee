"""User and operator mistakes through the real command: one ``error:`` line, the documented exit
code, no traceback, nothing created. As root (a read-only mount) and as an unprivileged user
(uid 65534 on a root-owned 0755 cache)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import NOBODY, assert_one_line_error, cli_env, run_forgespace
from support.mounts import MountRefused, remount, tmpfs
from support.procs import make_project
from support.s3server import env_for

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is 0700: uid 65534 could not
    even reach a cache inside it)."""
    root = Path("/tmp") / f"forgespace-errors-{os.getpid()}-{os.urandom(4).hex()}"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cached(base: Path) -> tuple[dict[str, str], str, dict[str, str]]:
    """A root-owned cache (0755) holding a target: a shared workspace and an isolated run."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(base / "cache"), "STORAGE_DIR": str(base / "store")}
    )
    cache = WorkspaceCache(settings)
    tid = cache.store.upload_target(make_project(base / "proj", files=5))
    paths = {
        "shared": cache.get_target(tid, "rs", "shared"),
        "isolated": cache.get_target(tid, "ri", "isolated"),
    }
    cache.index.close()
    return cli_env(env_for(settings)), tid, paths


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["abc\n", "abc\x00x", "a\tb"])
def test_get_with_a_control_character_in_the_id_exits_2_and_creates_nothing(
    base: Path, bad: str
) -> None:
    env = cli_env(os.environ.copy(), CACHE_DIR=str(base / "c"), STORAGE_DIR=str(base / "s"))
    if "\x00" in bad:
        # argv cannot carry NUL: the run id reaches the engine through the Python API
        from forgespace.errors import InvalidIdError

        with pytest.raises(InvalidIdError, match="control character"):
            WorkspaceCache(Settings.from_env(env)).get_target("t1", bad, "isolated")
        return
    proc = run_forgespace(env, "get", bad, "--run-id", "r1")
    line = assert_one_line_error(proc, 2, f"invalid target_id {bad!r}", "control character")
    assert proc.stderr.strip() == line and proc.stdout == ""
    assert not (base / "c").exists()


# --- read-only commands on a missing cache -------------------------------------------------
@pytest.mark.parametrize("cmd", [["cache", "status"], ["cache", "ls"], ["cache", "verify"]])
def test_read_only_commands_never_create_cache_dir(base: Path, cmd: list[str]) -> None:
    env = cli_env(os.environ.copy(), CACHE_DIR=str(base / "missing"))
    proc = run_forgespace(env, *cmd, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # still one valid JSON document on stdout
    assert doc.get("entries", 0) == 0 and doc.get("targets", []) in ([], 0)
    assert f"CACHE_DIR {base / 'missing'} does not exist (nothing cached yet)" in proc.stderr
    assert run_forgespace(env, *cmd).returncode == 0
    assert not (base / "missing").exists()
    # an existing directory forgespace never used: no .forgespace/ appears in it either
    (base / "empty").mkdir()
    env["CACHE_DIR"] = str(base / "empty")
    proc = run_forgespace(env, *cmd, "--json")
    assert proc.returncode == 0 and "nothing cached yet" in proc.stderr
    assert list((base / "empty").iterdir()) == []


@pytest.mark.parametrize(
    "cmd", [["cache", "status"], ["cache", "ls"], ["cache", "gc"], ["get", "t1", "--run-id", "r"]]
)
def test_cache_dir_that_is_a_file_is_one_line(base: Path, cmd: list[str]) -> None:
    (base / "file").write_text("not a directory\n")
    env = cli_env(os.environ.copy(), CACHE_DIR=str(base / "file"))
    proc = run_forgespace(env, *cmd)
    assert_one_line_error(proc, 1, f"CACHE_DIR {base / 'file'} is not a directory")


# --- a read-only cache (root, read-only mount) ---------------------------------------------
def test_read_only_mount_reads_work_and_writes_say_what_and_where(
    base: Path, tmp_path: Path
) -> None:
    try:
        with tmpfs(base / "ro", size="16m") as mnt:
            settings = Settings.from_env(
                {"CACHE_DIR": str(mnt / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
            )
            env = cli_env(env_for(settings))
            # set up in subprocesses: this process must hold no file open for writing on the
            # mount, or the remount to read-only is refused (busy)
            proj = make_project(tmp_path / "proj", files=5)
            tid = run_forgespace(env, "upload", str(proj)).stdout.splitlines()[-1]
            for args in (["--run-id", "rs", "--isolation", "shared"], ["--run-id", "ri"]):
                assert run_forgespace(env, "get", tid, *args).returncode == 0
            before = _tree(mnt)
            remount(mnt, "ro")
            try:
                for cmd in (["cache", "status"], ["cache", "ls"], ["cache", "verify"]):
                    proc = run_forgespace(env, *cmd, "--json")
                    assert proc.returncode == 0, proc.stderr
                    assert "Traceback" not in proc.stderr
                status = json.loads(run_forgespace(env, "cache", "status", "--json").stdout)
                assert status["entries"] == 2 and status["live_leases"] == 2
                for cmd in (
                    ["get", tid, "--run-id", "rs", "--isolation", "shared"],
                    ["get", tid, "--run-id", "ri"],
                    ["get", tid, "--run-id", "new"],
                    ["cleanup", str(mnt / "cache" / tid / "ri" / "workspace")],
                    ["cache", "gc"],
                    ["cache", "evict", tid],
                ):
                    proc = run_forgespace(env, *cmd)
                    line = assert_one_line_error(proc, 1, str(mnt / "cache"))
                    assert "read-only" in line.lower(), line
            finally:
                remount(mnt, "rw")
            assert _tree(mnt) == before
    except MountRefused as exc:
        pytest.skip(f"tmpfs mount unavailable: {exc}")


# --- not our user's cache (uid 65534 on a root-owned 0755 cache) ---------------------------
def test_unprivileged_user_reads_but_cannot_write_a_root_owned_cache(cached, base: Path) -> None:
    env, tid, paths = cached
    before = _tree(base / "cache")
    for cmd in (["cache", "status"], ["cache", "ls"], ["cache", "verify"]):
        proc = run_forgespace(env, *cmd, "--json", user=NOBODY)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    doc = json.loads(run_forgespace(env, "cache", "status", "--json", user=NOBODY).stdout)
    assert doc["entries"] == 2
    for cmd in (
        ["get", tid, "--run-id", "rs", "--isolation", "shared"],
        ["get", tid, "--run-id", "ri"],
        ["get", tid, "--run-id", "new"],
        ["cleanup", paths["isolated"]],
        ["cache", "evict", tid, "--force"],
    ):
        proc = run_forgespace(env, *cmd, user=NOBODY)
        line = assert_one_line_error(proc, 1, str(base / "cache"))
        assert "ermission denied" in line, line
    # gc: expired leases make it want to write the index
    old = {**env, "CACHE_LEASE_TTL": "1s", "CACHE_TTL": "1s"}
    proc = run_forgespace(old, "cache", "gc", user=NOBODY)
    assert_one_line_error(proc, 1, str(base / "cache"), "ermission denied")
    assert _tree(base / "cache") == before


def test_upload_to_a_store_the_user_cannot_write_exits_1(cached, base: Path) -> None:
    env, _, _ = cached
    proj = make_project(base / "proj2", files=3)
    proc = run_forgespace(env, "upload", str(proj), user=NOBODY)
    assert_one_line_error(proc, 1, "cannot write to the", str(base / "store"), "ermission denied")
    # the user's own mistake stays a usage error (exit 2)
    proc = run_forgespace(env, "upload", str(base / "nope"), user=NOBODY)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr
