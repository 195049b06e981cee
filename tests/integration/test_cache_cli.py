"""`forgespace cache ...` as a command: JSON shapes, gc, evict refusing leased targets, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from support.procs import make_project

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings
from forgespace.storage import open_store

STATUS_KEYS = {
    "cache_dir",
    "bytes",
    "entry_bytes",
    "blob_bytes",
    "limit_bytes",
    "used_ratio",
    "entries",
    "entries_by_kind",
    "targets",
    "live_leases",
    "hits",
    "misses",
    "downloads",
    "bytes_downloaded",
    "evictions",
    "counters",
    "oldest_access",
    "oldest_access_iso",
    "oldest_access_age_seconds",
    "reclaimable_bytes",
    "ttl_seconds",
    "lease_ttl_seconds",
    "cleanup_interval_seconds",
}
ENTRY_KEYS = {
    "key",
    "kind",
    "mode",
    "run_id",
    "bytes",
    "files",
    "created",
    "created_iso",
    "last_access",
    "last_access_iso",
    "live_leases",
}
PLAN_KEYS = {"key", "target_id", "kind", "reason", "bytes", "last_access", "last_access_iso"}
GC_KEYS = {
    "dry_run",
    "limit_bytes",
    "total_before",
    "total_after",
    "freed_bytes",
    "plan",
    "evicted",
    "skipped",
    "adopted",
    "plan_seconds",
    "seconds",
}


def forgespace(env: dict[str, str], *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from forgespace.cli import main; main()", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, f"{args}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def as_json(env: dict[str, str], *args: str, rc: int = 0) -> dict:
    return json.loads(forgespace(env, *args, "--json", rc=rc).stdout)


@pytest.fixture
def populated(settings: Settings, tmp_path: Path, settings_env) -> tuple[dict[str, str], dict]:
    """A cache with a shared target leased by one run, an unleased shared target, and an
    isolated run."""
    store = open_store(settings)
    ids = {n: store.upload_target(make_project(tmp_path / n, files=12, seed=n)) for n in "abc"}
    cache = WorkspaceCache(settings)
    cache.get_target(ids["a"], "run-a", "shared")
    cache.get_target(ids["b"], None, "shared")
    cache.get_target(ids["b"], None, "shared")  # a hit
    cache.get_target(ids["c"], "run-c", "isolated")
    return settings_env(settings), ids


def test_status_json(populated) -> None:
    env, _ = populated
    doc = as_json(env, "cache", "status")
    assert set(doc) == STATUS_KEYS
    assert doc["entries"] == 3 and doc["targets"] == 3
    assert doc["entries_by_kind"] == {"shared": 2, "cow-shared": 0, "run": 1}
    assert (doc["hits"], doc["misses"], doc["downloads"]) == (1, 3, 3)
    assert doc["live_leases"] == 2 and doc["bytes"] > 0
    assert doc["limit_bytes"] == 10 * 10**9 and doc["oldest_access_age_seconds"] >= 0
    # the directories were stored as manifests: their blobs, kept in the local blob store,
    # count against CACHE_MAX_SIZE beside the entries, and status says so
    blob_dir = Path(env["CACHE_DIR"]) / ".forgespace" / "blobs"
    on_disk = sum(p.stat().st_size for p in blob_dir.iterdir())
    assert doc["blob_bytes"] == on_disk > 0
    entries = as_json(env, "cache", "ls")["targets"]
    assert doc["entry_bytes"] == sum(e["bytes"] for t in entries for e in t["entries"])
    assert doc["bytes"] == doc["entry_bytes"] + doc["blob_bytes"]
    human = forgespace(env, "cache", "status").stdout
    assert "used" in human and "live leases" in human and "blob store" in human


def test_ls_json_per_target(populated) -> None:
    env, ids = populated
    doc = as_json(env, "cache", "ls")
    targets = {t["target_id"]: t for t in doc["targets"]}
    assert set(targets) == set(ids.values())
    assert doc["targets"][0]["target_id"] == ids["c"]  # most recent first
    a = targets[ids["a"]]
    assert set(a) == {
        "target_id",
        "kinds",
        "bytes",
        "files",
        "last_access",
        "last_access_iso",
        "live_leases",
        "entries",
    }
    assert a["kinds"] == ["shared"] and a["live_leases"] == 1
    (entry,) = a["entries"]
    assert set(entry) == ENTRY_KEYS and entry["key"] == f"{ids['a']}/workspace"
    assert targets[ids["b"]]["live_leases"] == 0
    assert targets[ids["c"]]["entries"][0]["run_id"] == "run-c"
    assert ids["a"][:8] in forgespace(env, "cache", "ls").stdout


def test_gc_dry_run_then_gc(populated) -> None:
    env, ids = populated
    # Only leases keep entries now (CACHE_MAX_SIZE cannot go below 1 MiB: a TTL of 0 instead).
    small = {**env, "CACHE_TTL": "0"}
    cache_dir = Path(env["CACHE_DIR"])
    plan = as_json(small, "cache", "gc", "--dry-run")
    assert set(plan) == GC_KEYS
    assert plan["dry_run"] is True and plan["evicted"] == [] and plan["freed_bytes"] == 0
    assert [(p["key"], p["reason"]) for p in plan["plan"]] == [(f"{ids['b']}/workspace", "ttl")]
    assert set(plan["plan"][0]) == PLAN_KEYS
    assert (cache_dir / ids["b"] / "workspace").is_dir()  # dry run: nothing deleted
    assert "ttl" in forgespace(small, "cache", "gc", "--dry-run").stdout
    done = as_json(small, "cache", "gc")
    assert [p["key"] for p in done["evicted"]] == [f"{ids['b']}/workspace"]
    assert done["freed_bytes"] == plan["plan"][0]["bytes"] > 0
    assert done["total_after"] == done["total_before"] - done["freed_bytes"]
    assert not (cache_dir / ids["b"]).exists()
    assert (cache_dir / ids["a"] / "workspace").is_dir() and (
        cache_dir / ids["c"] / "run-c"
    ).is_dir()


def test_evict_refuses_a_leased_target_unless_forced(populated) -> None:
    env, ids = populated
    cache_dir = Path(env["CACHE_DIR"])
    refused = forgespace(env, "cache", "evict", ids["a"], rc=1)
    assert "refusing to evict" in refused.stderr and "run-a" in refused.stderr
    assert "--force" in refused.stderr
    assert (cache_dir / ids["a"] / "workspace").is_dir()
    doc = as_json(env, "cache", "evict", ids["b"])
    assert doc["target_id"] == ids["b"] and [e["key"] for e in doc["evicted"]] == [
        f"{ids['b']}/workspace"
    ]
    assert not (cache_dir / ids["b"]).exists()
    forced = as_json(env, "cache", "evict", ids["a"], "--force")
    assert forced["freed_bytes"] > 0 and not (cache_dir / ids["a"]).exists()
    assert as_json(env, "cache", "status")["live_leases"] == 1  # run-c's remains
    bad = forgespace(env, "cache", "evict", "../etc", rc=2)
    assert "target_id" in bad.stderr


def test_verify_finds_and_repairs(populated) -> None:
    env, ids = populated
    cache_dir = Path(env["CACHE_DIR"])
    ok = as_json(env, "cache", "verify")
    assert ok["ok"] is True and ok["entries_indexed"] == ok["entries_on_disk"] == 3
    # tamper with a shared workspace (root ignores its read-only modes) and lose a run dir
    victim = next((cache_dir / ids["a"] / "workspace").rglob("*.py"))
    os.chmod(victim, 0o644)
    victim.write_text("tampered\n")
    os.chmod(victim, 0o444)
    os.rename(cache_dir / ids["c"] / "run-c", cache_dir / ids["c"] / "run-lost")
    bad = as_json(env, "cache", "verify", rc=1)
    assert bad["ok"] is False
    assert bad["missing_on_disk"] == [f"{ids['c']}/run-c"]
    assert bad["missing_from_index"] == [f"{ids['c']}/run-lost"]
    rel = victim.relative_to(cache_dir / ids["a"] / "workspace")
    assert any(str(rel) in d and "modified" in d for d in bad["modified"][ids["a"]])
    fixed = as_json(env, "cache", "verify", "--repair")
    assert fixed["repaired"] and fixed["ok"] is False  # it reports what it found...
    assert as_json(env, "cache", "verify")["ok"] is True  # ...and afterwards all is well
    assert victim.read_text() != "tampered\n"


def test_verify_table_names_each_problem_and_repair_says_what_it_did(populated) -> None:
    env, ids = populated
    env = {**env, "COLUMNS": "300"}
    cache_dir = Path(env["CACHE_DIR"])
    ws = cache_dir / ids["a"] / "workspace"
    os.chmod(ws, 0o755)
    for i in range(25):
        (ws / f"drop{i:02}.txt").write_text("x")
    os.rename(cache_dir / ids["c"] / "run-c", cache_dir / ids["c"] / "run-lost")
    proc = forgespace(env, "cache", "verify", rc=1)
    rows = [
        [c.strip() for c in line.strip("│").split("│")]
        for line in proc.stdout.splitlines()
        if line.startswith("│")
    ]
    assert ["on disk, not in the index", f"{ids['c']}/run-lost"] in rows
    assert ["in the index, not on disk", f"{ids['c']}/run-c"] in rows
    modified = [r[1] for r in rows if r[0] == f"modified shared workspace of {ids['a']}"]
    # 26 differences (the writable directory, 25 files added): 20 shown, the rest counted.
    assert len(modified) == 21 and modified[-1] == "... 6 more"
    assert f"{ids['a']}/workspace: added: drop00.txt" in modified
    assert proc.stdout.splitlines()[-1] == "3 indexed, 3 on disk: problems found"

    fixed = forgespace(env, "cache", "verify", "--repair")
    assert "repaired: index rebuilt from disk" in fixed.stdout
    assert f"repaired: {ids['a']}/workspace re-extracted from its cached target" in fixed.stdout
    assert not (ws / "drop00.txt").exists()
    clean = forgespace(env, "cache", "verify")
    assert clean.stdout == "3 indexed, 3 on disk: consistent\n"


def test_status_rebuilds_a_deleted_index(populated) -> None:
    env, _ = populated
    index = Path(env["CACHE_DIR"]) / ".forgespace" / "index.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    proc = forgespace(env, "cache", "status", "--json")
    assert "rebuilt" in proc.stderr
    assert json.loads(proc.stdout)["entries"] == 3


# --- conventions: piped output, -q, prune, purge, dir, reclaimable, ISO times, get/cleanup ---


def test_piped_ls_prints_full_ids_in_plain_columns_and_q_prints_ids_only(populated) -> None:
    env, ids = populated
    out = forgespace(env, "cache", "ls").stdout  # stdout is a pipe here
    lines = out.splitlines()
    assert lines[0].split() == [
        "TARGET", "ENTRY", "MODE", "BYTES", "FILES", "LAST_ACCESS", "LEASES"
    ]  # fmt: skip
    assert "┃" not in out and "…" not in out
    rows = [ln.split() for ln in lines[1:]]
    assert {r[0] for r in rows} == set(ids.values())  # whole ids, copyable into `cache evict`
    for r in rows:
        assert len(r) == 7 and int(r[3]) > 0  # plain output: exact bytes and ISO times
        datetime.fromisoformat(r[5])
    quiet = forgespace(env, "cache", "ls", "-q").stdout.split()
    assert quiet == [t["target_id"] for t in as_json(env, "cache", "ls")["targets"]]


def test_json_times_have_iso_twins(populated) -> None:
    env, _ = populated
    doc = as_json(env, "cache", "ls")
    for t in doc["targets"]:
        for e in t["entries"]:
            for field in ("created", "last_access"):
                iso = datetime.fromisoformat(e[f"{field}_iso"])
                assert iso.utcoffset() is not None  # explicit UTC offset
                assert abs(iso.timestamp() - e[field]) < 1
    status = as_json(env, "cache", "status")
    assert abs(datetime.fromisoformat(status["oldest_access_iso"]).timestamp()
               - status["oldest_access"]) < 1  # fmt: skip


def test_status_shows_reclaimable_unleased_bytes(populated) -> None:
    env, _ = populated
    entries = [e for t in as_json(env, "cache", "ls")["targets"] for e in t["entries"]]
    unleased = sum(e["bytes"] for e in entries if e["live_leases"] == 0)
    status = as_json(env, "cache", "status")
    assert 0 < status["reclaimable_bytes"] == unleased < status["bytes"]
    human = forgespace(env, "cache", "status").stdout
    assert "reclaimable:" in human and "oldest access:" in human


def test_prune_removes_only_unleased_entries_older_than_the_age(populated) -> None:
    env, ids = populated
    cache_dir = Path(env["CACHE_DIR"])
    recent = as_json(env, "cache", "prune", "--older-than", "1d")
    assert recent["entries"] == [] and recent["freed_bytes"] == 0
    plan = as_json(env, "cache", "prune", "--older-than", "0s", "--dry-run")
    assert [e["key"] for e in plan["entries"]] == [f"{ids['b']}/workspace"]
    assert plan["would_free_bytes"] > 0 and (cache_dir / ids["b"] / "workspace").is_dir()
    assert len(plan["kept"]) == 2  # run-a's shared lease and run-c's isolated run
    done = as_json(env, "cache", "prune", "--older-than", "0s")
    assert done["freed_bytes"] == plan["would_free_bytes"]
    assert not (cache_dir / ids["b"]).exists()
    assert (cache_dir / ids["a"] / "workspace").is_dir() and (
        cache_dir / ids["c"] / "run-c"
    ).is_dir()
    bad = forgespace(env, "cache", "prune", "--older-than", "2 days", rc=2)
    [line] = bad.stderr.splitlines()
    assert line.startswith("error:") and "--older-than" in line and "30m" in line


def test_purge_keeps_leased_entries_unless_forced(populated) -> None:
    env, ids = populated
    cache_dir = Path(env["CACHE_DIR"])
    kept = as_json(env, "cache", "purge")
    assert [e["key"] for e in kept["entries"]] == [f"{ids['b']}/workspace"]
    assert len(kept["kept"]) == 2
    assert (cache_dir / ids["a"] / "workspace").is_dir() and (
        cache_dir / ids["c"] / "run-c"
    ).is_dir()
    forced = as_json(env, "cache", "purge", "--force")
    assert {e["key"] for e in forced["entries"]} == {f"{ids['a']}/workspace", f"{ids['c']}/run-c"}
    assert as_json(env, "cache", "status")["live_leases"] == 0
    assert as_json(env, "cache", "ls")["targets"] == []
    assert sorted(os.listdir(cache_dir)) == [".forgespace"]


def test_purge_dry_run_lists_what_would_go_and_says_what_stays(populated) -> None:
    env, ids = populated
    cache_dir = Path(env["CACHE_DIR"])
    before = sorted(os.listdir(cache_dir))
    proc = forgespace(env, "cache", "purge", "--dry-run")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TARGET", "ENTRY", "KIND", "BYTES", "LAST_ACCESS"]
    assert [line.split()[:3] for line in lines[1:-1]] == [[ids["b"], "workspace", "shared"]]
    assert lines[-1].startswith("would remove 1 entry, would free ")
    # What live runs lease is named on stderr, with how to remove it anyway.
    assert sorted(proc.stderr.splitlines()) == sorted(
        [
            f"{ids['a']}/workspace: kept (leased by a live run; --force removes it)",
            f"{ids['c']}/run-c: kept (leased by a live run; --force removes it)",
        ]
    )
    assert sorted(os.listdir(cache_dir)) == before  # nothing deleted
    forced = as_json(env, "cache", "purge", "--force", "--dry-run")
    assert {e["key"] for e in forced["entries"]} == {
        f"{ids['a']}/workspace",
        f"{ids['b']}/workspace",
        f"{ids['c']}/run-c",
    }
    assert forced["kept"] == [] and forced["freed_bytes"] == 0 and forced["would_free_bytes"] > 0
    assert sorted(os.listdir(cache_dir)) == before


@pytest.mark.parametrize("args", [["purge"], ["prune", "--older-than", "0s"]])
def test_purge_and_prune_of_a_cache_never_created_remove_nothing_and_create_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    env = {**os.environ, "CACHE_DIR": str(tmp_path / "never")}
    proc = forgespace(env, "cache", *args)
    assert proc.stdout == "removed 0 entries, freed 0 B\n"
    assert not (tmp_path / "never").exists()


def test_gc_with_nothing_to_do_says_so(populated) -> None:
    env, _ = populated
    out = forgespace(env, "cache", "gc").stdout
    assert out.startswith("nothing to evict:") and "within the limit" in out


def test_cache_dir_prints_it_without_creating_it(tmp_path: Path) -> None:
    env = {**os.environ, "CACHE_DIR": str(tmp_path / "nope")}
    assert forgespace(env, "cache", "dir").stdout == f"{tmp_path / 'nope'}\n"
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("mode", ["isolated", "copy-on-write"])
def test_get_without_run_id_makes_one_and_cleanup_infers_the_mode(
    settings: Settings, tmp_path: Path, settings_env, mode: str
) -> None:
    env = settings_env(settings)
    tid = open_store(settings).upload_target(make_project(tmp_path / "p", files=3, seed="g"))
    got = forgespace(env, "get", tid, "--isolation", mode)
    path = Path(got.stdout.splitlines()[-1])
    run_id = path.parent.name
    assert path == settings.cache_dir / tid / run_id / "workspace" and path.is_dir()
    assert f"run id {run_id}" in got.stderr
    other = "isolated" if mode == "copy-on-write" else "copy-on-write"
    refused = forgespace(env, "cleanup", str(path), "--isolation", other, rc=2)
    [line] = refused.stderr.splitlines()
    assert f"is a {mode} workspace" in line and "nothing was deleted" in line
    assert path.is_dir()
    done = forgespace(env, "cleanup", str(path))  # no --isolation: inferred
    assert f"({mode})" in done.stderr and not path.parent.exists()
    assert as_json(env, "cache", "status")["live_leases"] == 0


def test_version_and_completion(tmp_path: Path) -> None:
    from importlib.metadata import version

    assert (
        forgespace(dict(os.environ), "--version").stdout == f"forgespace {version('forgespace')}\n"
    )
    env = {
        **os.environ,
        "_FORGESPACE_COMPLETE": "complete_bash",
        "COMP_WORDS": "forgespace cache p",
        "COMP_CWORD": "2",
    }
    cmd = [str(Path(sys.executable).with_name("forgespace"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["prune", "purge"]


def test_a_command_group_alone_prints_its_help_not_an_error(tmp_path: Path) -> None:
    from support.cli import run_forgespace

    env = {**os.environ, "CACHE_DIR": str(tmp_path / "never"), "COLUMNS": "200"}
    proc = run_forgespace(env, "cache")
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "Usage: forgespace cache [OPTIONS] COMMAND [ARGS]..." in text
    for command in ("status", "ls", "gc", "prune", "purge", "dir", "evict", "verify"):
        assert f"│ {command} " in text
    assert "error:" not in text and "Traceback" not in text
    assert not (tmp_path / "never").exists()


def test_on_a_terminal_the_commands_print_tables(populated) -> None:
    from support.cli import run_on_terminal

    env, ids = populated
    rc, status = run_on_terminal(env, "cache", "status")
    assert rc == 0 and f"forgespace cache: {env['CACHE_DIR']}" in status
    assert "entries" in status and "3" in status and "│" in status
    rc, ls = run_on_terminal(env, "cache", "ls")
    assert rc == 0 and "┃" in ls  # a table, not the plain columns of a pipe
    for tid in ids.values():
        assert tid in ls  # whole ids, never cut
    rc, gc = run_on_terminal(env, "cache", "gc", "--dry-run")
    assert rc == 0 and "nothing to evict: " in gc  # all recent, under the limit
    rc, prune = run_on_terminal(env, "cache", "prune", "--older-than", "0s", "--dry-run")
    assert rc == 0 and "(dry run: nothing deleted)" in prune
    # only b's entry: a's shared workspace and c's run are leased by their runs
    assert ids["b"] in prune and ids["a"] not in prune and ids["c"] not in prune
    assert "would remove 1 entry, would free" in prune
    # a tampered shared workspace: verify names it in its table and exits 1
    cache_dir = Path(env["CACHE_DIR"])
    victim = next((cache_dir / ids["a"] / "workspace").rglob("*.py"))
    os.chmod(victim, 0o644)
    victim.write_text("tampered\n")
    rc, verify = run_on_terminal(env, "cache", "verify")
    assert rc == 1 and f"modified shared workspace of {ids['a']}" in verify
    assert str(victim.relative_to(cache_dir / ids["a"] / "workspace")) in verify
