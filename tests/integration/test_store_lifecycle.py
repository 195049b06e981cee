"""`forgespace store ls|rm|prune` on both stores, and prune racing uploads across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import assert_one_line_error, cli_env, run_forgespace
from support.procs import start_role, wait_for
from support.s3server import S3Server

from forgespace.config import Settings
from forgespace.errors import TargetNotFoundError
from forgespace.storage import open_store, target_key
from forgespace.storage.lifecycle import ManagedStore, PrunePlan, plan_prune
from forgespace.storage.s3 import PRUNE_MARKER_PREFIX, S3Store

pytestmark = pytest.mark.integration
Env = Callable[[Settings], dict[str, str]]


def _store(settings: Settings) -> ManagedStore:
    store = open_store(settings)
    assert isinstance(store, ManagedStore)
    return store


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def test_store_cli_ls_prune_rm(
    any_store_settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    env = cli_env(settings_env(any_store_settings))
    store = _store(any_store_settings)
    f = tmp_path / "t.bin"
    f.write_bytes(os.urandom(5000))
    tid = store.upload_target(f)
    other = store.upload_target(f, target_id="mine")
    store.put_result("wf-1/results.json", b'{"ok": 1}')

    doc = _json(run_forgespace(env, "store", "ls", "--json"))
    assert doc["store"] == store.display_name
    assert sorted(t["target_id"] for t in doc["targets"]) == sorted([tid, other])  # type: ignore[union-attr,index]
    assert [r["key"] for r in doc["results"]] == ["wf-1/results.json"]  # type: ignore[union-attr,index]
    assert doc["bytes"] == 5000 * 2 + 9

    # young: the defaults (7d targets, 30d results) prune nothing
    doc = _json(run_forgespace(env, "store", "prune", "--json"))
    assert (doc["planned"], doc["deleted"], doc["freed_bytes"]) == ([], [], 0)
    # a dry run names everything older than 0s and deletes nothing
    doc = _json(run_forgespace(env, "store", "prune", "--older-than", "0s", "--dry-run", "--json"))
    assert doc["dry_run"] is True and doc["deleted"] is None
    assert doc["expected_freed_bytes"] == 5000 * 2 + 9
    assert len(store.list_targets()) == 2 and len(store.list_results()) == 1
    # targets only: the result stays
    doc = _json(
        run_forgespace(
            env, "store", "prune", "--targets-older-than", "0s", "--results-older-than", "1h",
            "--json",
        )
    )  # fmt: skip
    assert sorted(o["key"] for o in doc["deleted"]) == sorted([tid, other])  # type: ignore[union-attr,index]
    assert store.list_targets() == [] and len(store.list_results()) == 1
    with pytest.raises(TargetNotFoundError):
        store.stat_target(tid)

    again = store.upload_target(f)
    proc = run_forgespace(env, "store", "rm", again)
    assert proc.returncode == 0, proc.stderr
    assert again in proc.stderr and store.list_targets() == []
    assert_one_line_error(run_forgespace(env, "store", "rm", again), 3, again, "not found")
    assert_one_line_error(run_forgespace(env, "store", "rm", "../x"), 2, "invalid target_id")
    bad = run_forgespace(env, "store", "prune", "--older-than", "30 days")
    assert bad.returncode == 2 and "--older-than" in bad.stderr and "7d" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_store_ls_never_creates_the_store(tmp_path: Path) -> None:
    env = cli_env(
        {**os.environ, "STORAGE_DIR": str(tmp_path / "none"), "CACHE_DIR": str(tmp_path / "c")}
    )
    doc = _json(run_forgespace(env, "store", "ls", "--json"))
    assert (doc["targets"], doc["results"]) == ([], [])
    assert _json(run_forgespace(env, "store", "prune", "--json"))["deleted"] == []
    assert not (tmp_path / "none").exists()


def test_s3_reupload_restarts_the_age(s3_settings: Settings, tmp_path: Path) -> None:
    store = _store(s3_settings)
    f = tmp_path / "t.bin"
    f.write_bytes(b"data")
    tid = store.upload_target(f)
    (first,) = store.list_targets()
    wait_for(lambda: store.upload_target(f) and store.list_targets()[0].modified > first.modified,
             10, "LastModified to move on (one-second resolution)")  # fmt: skip
    (after,) = store.list_targets()
    # a prune planned with a cutoff between the two uploads keeps it
    plan = plan_prune(store, target_ttl=0.0, result_ttl=None, temp_grace=0.0, now=after.modified)
    assert plan.targets == ()
    assert store.stat_target(tid).sha256 is not None  # the refresh kept forgespace's sha256


# --- races across processes --------------------------------------------------------------
def _child(role: str, spec: dict[str, object], env: dict[str, str]) -> subprocess.Popen[str]:
    return start_role("prune_race", role, spec, env)


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, int]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def test_local_prune_racing_reuploads_never_loses_a_returned_target(
    settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    """An uploader re-uploads content the store holds (after making it look two hours old)
    while a pruner deletes everything older than an hour, in a loop, in two processes: every
    upload that returned finds its object there, although the pruner kept deleting it."""
    f = tmp_path / "t.bin"
    f.write_bytes(os.urandom(64 * 1024))
    _store(settings).upload_target(f)
    stop = tmp_path / "stop"
    env = settings_env(settings)
    pruner = _child("pruner", {"stop": str(stop)}, env)
    uploader = _child(
        "uploader",
        {"source": str(f), "stop": str(stop), "root": str(settings.storage_dir), "iterations": 400},
        env,
    )
    try:
        up = _result(uploader, 240)
        pr = _result(pruner, 60)
    finally:
        for p in (pruner, uploader):
            if p.poll() is None:
                p.kill()
    assert up["lost"] == 0, (up, pr)
    assert pr["deleted"] > 0, pr  # the race was run: the pruner did delete aged objects


def test_s3_prune_planned_before_a_reupload_keeps_it(
    s3_settings: Settings, settings_env: Env, tmp_path: Path
) -> None:
    """Plan in this process, re-upload the same content in another, then execute: kept."""
    store = _store(s3_settings)
    f = tmp_path / "t.bin"
    f.write_bytes(os.urandom(10_000))
    tid = store.upload_target(f)
    (obj,) = store.list_targets()
    plan = plan_prune(
        store, target_ttl=0.0, result_ttl=None, temp_grace=0.0, now=obj.modified + 0.5
    )
    assert [o.key for o in plan.targets] == [tid]
    code = "import sys; from forgespace.storage import open_store; from forgespace.config import Settings; print(open_store(Settings.from_env()).upload_target(sys.argv[1]))"  # noqa: E501
    wait_for(
        lambda: subprocess.run(
            [sys.executable, "-c", code, str(f)], env=settings_env(s3_settings), check=True,
            capture_output=True, timeout=60,
        ) and store.list_targets()[0].modified > obj.modified,
        15,
        "a re-upload in another process to restart the age",
    )  # fmt: skip
    result = plan.execute(store)
    assert [o.key for o in result.kept] == [tid] and result.deleted == ()
    assert store.stat_target(tid).size == 10_000


def test_s3_reupload_during_a_prune_delete_is_stored_again(
    s3_settings: Settings, s3_server: S3Server, settings_env: Env, tmp_path: Path
) -> None:
    """The narrow window: a prune has re-checked the object (old) and its DELETE lands after
    another process's upload refreshed it. The upload sees the prune's intent marker, waits,
    finds the object gone and uploads it again before returning."""
    store = _store(s3_settings)
    assert isinstance(store, S3Store)
    f = tmp_path / "t.bin"
    data = os.urandom(20_000)
    f.write_bytes(data)
    tid = store.upload_target(f)
    key = target_key(tid)
    marker = f"{PRUNE_MARKER_PREFIX}{tid}/{uuid.uuid4().hex}"
    store.client.put_object(Bucket=store.bucket, Key=marker, Body=b"")  # the prune's intent
    s3_server.reset_counts()
    code = "import sys; from forgespace.storage import open_store; from forgespace.config import Settings; print(open_store(Settings.from_env()).upload_target(sys.argv[1]))"  # noqa: E501
    up = subprocess.Popen(
        [sys.executable, "-c", code, str(f)],
        env=settings_env(s3_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the upload's refresh (a bodiless self-copy PUT), then it waits on the marker
        wait_for(lambda: s3_server.request_count("PUT", key) >= 1, 30, "the upload's refresh")
        assert up.poll() is None, up.communicate()  # still waiting for the prune
        store.client.delete_object(Bucket=store.bucket, Key=key)  # the prune's late DELETE
        store.client.delete_object(Bucket=store.bucket, Key=marker)  # the prune is done
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, err
    assert out.strip() == tid
    assert s3_server.bytes_received(key) == 20_000  # uploaded again, whole
    dest = tmp_path / "dest"
    store.download_target(tid, dest)
    assert dest.read_bytes() == data


def test_prune_deletes_old_results_and_keeps_what_was_uploaded_after_its_cutoff(
    any_store_settings: Settings, tmp_path: Path
) -> None:
    store = _store(any_store_settings)
    f = tmp_path / "t.bin"
    f.write_bytes(b"target bytes")
    tid = store.upload_target(f)
    store.put_result("wf-1/results.json", b'{"n": 1}')
    store.put_result("wf-2/out.sarif", b"{}")
    ahead = time.time() + 3600  # everything stored is older than this
    plan = plan_prune(store, target_ttl=0.0, result_ttl=0.0, temp_grace=0.0, now=ahead)
    assert sorted(o.key for o in plan.results) == ["wf-1/results.json", "wf-2/out.sarif"]
    assert [o.key for o in plan.targets] == [tid]
    # executed with a target cutoff the target's last upload is after (as when it is uploaded
    # again between the plan and the deletion): the target stays, the results go
    later = PrunePlan(target_cutoff=0.0, result_cutoff=ahead, temp_grace=0.0,
                      targets=plan.targets, results=plan.results)  # fmt: skip
    result = later.execute(store)
    assert sorted(o.key for o in result.deleted) == ["wf-1/results.json", "wf-2/out.sarif"]
    assert [o.key for o in result.kept] == [tid]
    assert store.list_results() == [] and [o.key for o in store.list_targets()] == [tid]
    assert result.freed_bytes == len(b'{"n": 1}') + 2
    assert later.execute(store).deleted == ()  # gone meanwhile: nothing deleted twice
