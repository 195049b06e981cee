"""The human (table) output of `forgespace store ls|prune` and `fleet status`: what an operator
reads without --json names the same objects, sizes and totals as the JSON does."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import cli_env, run_forgespace

from forgespace.config import Settings
from forgespace.storage import open_store
from forgespace.temporal.fleet import HostAd, advertisement_key

pytestmark = pytest.mark.integration
Env = Callable[[Settings], dict[str, str]]


def test_store_ls_and_prune_tables_name_each_object_and_the_totals(
    settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    env = cli_env(settings_env(settings))
    store = open_store(settings)
    f = tmp_path / "t.bin"
    f.write_bytes(os.urandom(5000))
    tid = store.upload_target(f, target_id="t-table")
    store.put_result("wf-1/results.json", b'{"ok": 1}')

    ls = run_forgespace(env, "store", "ls")
    assert ls.returncode == 0, ls.stderr
    assert f"local store {settings.storage_dir}: 1 target(s), 1 result(s)" in ls.stdout
    cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in ls.stdout.splitlines()]
    rows = {row[1]: row for row in cells if len(row) == 4}
    uploaded = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(store.list_targets()[0].modified))
    assert rows[tid] == ["target", tid, "5.0 kB", rows[tid][3]]
    assert rows[tid][3].startswith(uploaded)  # the last upload, UTC
    assert rows["wf-1/results.json"][:3] == ["result", "wf-1/results.json", "9 B"]

    dry = run_forgespace(env, "store", "prune", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 2 object(s), 5.0 kB" in dry.stdout
    assert tid in dry.stdout and "wf-1/results.json" in dry.stdout
    assert len(store.list_targets()) == 1 and len(store.list_results()) == 1  # nothing went

    done = run_forgespace(env, "store", "prune", "--older-than", "0s")
    assert done.returncode == 0, done.stderr
    assert "removed 2 object(s), 5.0 kB" in done.stdout and tid in done.stdout
    assert "pruned 2 object(s), 5.0 kB from the local store" in done.stderr
    assert store.list_targets() == [] and store.list_results() == []


def test_fleet_status_table_shows_each_host_and_what_live_hosts_hold(
    settings: Settings, settings_env: Env
) -> None:
    env = cli_env(settings_env(settings))
    empty = run_forgespace(env, "fleet", "status")
    assert empty.returncode == 0, empty.stderr
    assert "no host has advertised yet" in empty.stdout

    store = open_store(settings)
    now = time.time()
    ads = [
        HostAd(
            host="alpha", task_queue="q", host_queue="q@alpha", updated=now, slots=4, busy=1,
            holds={"shared": ["t1", "t2"], "copy-on-write": ["t2"]}, cache_bytes=2_000_000,
            limit_bytes=10_000_000, downloads=3, hits=7,
        ),
        # written an hour ago: still listed, but stale, and what it holds does not count
        HostAd(
            host="beta", task_queue="q", host_queue="q@beta", updated=now - 3600, slots=2,
            busy=0, holds={"shared": ["t3"], "copy-on-write": []}, downloads=1, hits=0,
        ),
    ]  # fmt: skip
    for ad in ads:
        store.put_result(advertisement_key(ad.host_queue), ad.to_json())
    proc = run_forgespace(env, "fleet", "status", "--task-queue", "q")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    alpha = next(line for line in lines if line.startswith("│ alpha"))
    beta = next(line for line in lines if line.startswith("│ beta"))
    assert "serving" in alpha and "3/4" in alpha and "2.0 MB of 10.0 MB" in alpha
    assert "stale" in beta and "0/2" in beta  # a stale host offers no slot
    t1 = next(line for line in lines if line.startswith("│ t1"))
    t2 = next(line for line in lines if line.startswith("│ t2"))
    assert "alpha" in t1 and "-" in t1  # shared on alpha, no copy-on-write copy
    assert t2.count("alpha") == 2
    assert not any(line.startswith("│ t3") for line in lines)  # held only by a stale host
    assert (
        "1 of 2 host(s) live, 3 free slot(s); 2 target(s) in 3 cop(ies); "
        "4 download(s), 7 saved by cache hits"
    ) in proc.stdout


def test_workflows_table_and_info_without_json(settings: Settings, settings_env: Env) -> None:
    from support.temporal import FIXTURE_WORKFLOWS

    only_fixtures = ("--workflows-dir", str(FIXTURE_WORKFLOWS), "--no-bundled")
    wide = run_forgespace(cli_env(settings_env(settings)), "workflows", *only_fixtures)
    assert wide.returncode == 0, wide.stderr
    rows = {
        cells[0]: cells
        for line in wide.stdout.splitlines()
        if line.startswith("│")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }
    assert rows["fs_marker_shared"] == [
        "fs_marker_shared",
        "shared",
        "1.0",
        "test",
        "Test fixture that inspects its shared workspace",
    ]
    assert rows["fs_marker_copy_on_write"][1] == "copy-on-write"
    # A narrow terminal gets the table without descriptions rather than wrapped ones.
    narrow_env = cli_env(settings_env(settings), COLUMNS="80")
    narrow = run_forgespace(narrow_env, "workflows", *only_fixtures)
    assert narrow.returncode == 0, narrow.stderr
    assert "fs_marker_isolated" in narrow.stdout and "description" not in narrow.stdout
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80

    info = run_forgespace(
        cli_env(settings_env(settings)), "workflows", "info", "fs_marker_shared", *only_fixtures
    )
    assert info.returncode == 0, info.stderr
    assert info.stdout.splitlines() == [
        "fs_marker_shared 1.0  (test)",
        "Test fixture that inspects its shared workspace",
        "workspace_isolation: shared",
        f"package: {FIXTURE_WORKFLOWS / 'fs_marker_shared'}",
        "parameters:",
        "  write (boolean) = false",
        "  hold_seconds (number, minimum 0)",
        "  started_file (string)",
        "  fail (boolean)",
        "  sarif (boolean)",
    ]
