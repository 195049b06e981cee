"""Content ids: upload_target returns an id derived from the content (the same tree or file
bytes give the same id, on any machine, whatever the mtimes, owners or umask), content the
store already holds is not sent again, and an explicit id is used as given — on both stores."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from support.cli import cli_env, run_forgespace
from support.procs import make_project
from support.s3server import S3Server

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.errors import InvalidIdError
from forgespace.layout import validate_id
from forgespace.storage.base import Store, target_key


@pytest.fixture
def store(any_store_settings: Settings) -> Store:
    return open_store(any_store_settings)


def test_same_tree_anywhere_gets_the_same_id(store: Store, tmp_path: Path) -> None:
    a = make_project(tmp_path / "a", files=20)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    for p in b.rglob("*"):  # other mtimes and other non-exec mode bits: same content
        os.utime(p, (1_000_000, 1_000_000), follow_symlinks=False)
        if p.is_file() and not os.access(p, os.X_OK):
            p.chmod(0o600)
    tid_a, tid_b = store.upload_target(a), store.upload_target(b)
    assert tid_a == tid_b
    assert tid_a.startswith("tree-") and validate_id(tid_a) == tid_a


@pytest.mark.parametrize(
    "change",
    ["one byte", "exec bit", "new empty dir", "renamed file", "symlink target"],
)
def test_any_change_extraction_would_show_changes_the_id(
    store: Store, tmp_path: Path, change: str
) -> None:
    root = make_project(tmp_path / "p", files=10)
    (root / "link").symlink_to("run.sh")
    before = store.upload_target(root)
    victim = next(p for p in sorted(root.rglob("*.py")))
    if change == "one byte":
        victim.write_bytes(b"X" + victim.read_bytes()[1:])
    elif change == "exec bit":
        victim.chmod(0o755)
    elif change == "new empty dir":
        (root / "empty").mkdir()
    elif change == "renamed file":
        victim.rename(victim.with_name("zz.py"))
    else:
        (root / "link").unlink()
        (root / "link").symlink_to("pkg0")
    assert store.upload_target(root) != before


def test_a_file_id_is_its_sha256_and_never_a_tree_id(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"some bytes\n")
    tid = store.upload_target(f)
    assert tid == "file-" + hashlib.sha256(b"some bytes\n").hexdigest()[:40]
    d = tmp_path / "d"
    d.mkdir()
    (d / "blob.bin").write_bytes(b"some bytes\n")
    assert store.upload_target(d).startswith("tree-")


def test_explicit_id_is_used_as_given_and_bad_ones_are_refused(
    store: Store, tmp_path: Path
) -> None:
    root = make_project(tmp_path / "p", files=5)
    assert store.upload_target(root, target_id="my-run-42") == "my-run-42"
    assert store.stat_target("my-run-42").size > 0
    content = store.upload_target(root)
    assert content != "my-run-42" and store.stat_target(content).size > 0
    with pytest.raises(InvalidIdError, match="'bad\\\\n'"):
        store.upload_target(root, target_id="bad\n")


def test_reupload_of_stored_content_writes_nothing_locally(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    store = open_store(settings)
    root = make_project(tmp_path / "p", files=30)
    tid = store.upload_target(root)
    obj = tmp_path / "store" / target_key(tid)
    st = obj.stat()
    assert store.upload_target(root) == tid
    again = obj.stat()
    # Not rewritten (same inode, same bytes); only its age restarts (store prune counts from
    # the last upload).
    assert again.st_ino == st.st_ino and again.st_mtime_ns >= st.st_mtime_ns
    # Nothing but the object, its sidecar, the id lock and the shared blobs (no temp file)
    # was left in the store.
    leftovers = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert leftovers == [".locks", "_blobs", tid]
    blob_files = sorted(p.parent.name for p in (tmp_path / "store" / "_blobs").rglob("*.*"))
    assert blob_files == [], blob_files


def test_reupload_to_s3_sends_no_object_bytes(
    s3_settings: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    store = open_store(s3_settings)
    root = make_project(tmp_path / "p", files=30)
    f = tmp_path / "single.bin"
    f.write_bytes(os.urandom(100_000))
    ids = [store.upload_target(root), store.upload_target(f)]
    s3_server.reset_counts()
    assert [store.upload_target(root), store.upload_target(f)] == ids
    for tid in ids:
        # one bodiless self-copy PUT restarts the object's age (store prune); no object bytes
        assert s3_server.bytes_received(target_key(tid)) == 0
        assert s3_server.request_count("PUT", target_key(tid)) == 1
        assert s3_server.request_count("POST", target_key(tid)) == 0  # no multipart either


def test_same_content_is_one_cache_entry(tmp_path: Path) -> None:
    """The point of content ids for runs: a second upload of the same tree is a cache hit."""
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    store = open_store(settings)
    cache = WorkspaceCache(settings, store=store)
    first = cache.get_target_report(
        store.upload_target(make_project(tmp_path / "a")), "r1", "shared"
    )
    second = cache.get_target_report(
        store.upload_target(make_project(tmp_path / "b")), "r2", "shared"
    )
    assert (first.downloaded, second.downloaded) == (True, False)
    assert first.path == second.path


def test_cli_upload_prints_the_content_id_and_takes_id(tmp_path: Path) -> None:
    env = cli_env(
        dict(os.environ), CACHE_DIR=str(tmp_path / "cache"), STORAGE_DIR=str(tmp_path / "store")
    )
    root = make_project(tmp_path / "p", files=5)
    out = run_forgespace(env, "upload", str(root))
    assert out.returncode == 0, out.stderr
    tid = out.stdout.strip().splitlines()[-1]
    assert tid == open_store(Settings.from_env(env)).upload_target(root)
    named = run_forgespace(env, "upload", str(root), "--id", "fuzzforge-7")
    assert named.returncode == 0 and named.stdout.strip().splitlines()[-1] == "fuzzforge-7"
    bad = run_forgespace(env, "upload", str(root), "--id", "../x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'../x'" in bad.stderr
