"""The three modes end to end on both backends (local store and S3 via moto), with object
GETs counted at the S3 proxy: isolated downloads per run, shared and copy-on-write once."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.procs import make_project, tree_digest
from support.s3server import S3Server

from forgespace.cache.workspace import WorkspaceCache
from forgespace.config import Settings

pytestmark = pytest.mark.integration


def test_modes_on_both_backends(
    any_store_settings: Settings, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    settings = any_store_settings
    project = make_project(tmp_path / "project", files=25)
    want = tree_digest(project)
    cache = WorkspaceCache(settings)
    tid = {
        m: cache.store.upload_target(project, target_id=f"t-{m}")
        for m in ("isolated", "shared", "cow")
    }
    f = tmp_path / "tool.bin"
    f.write_bytes(bytes(range(256)) * 40)
    fid = cache.store.upload_target(f)

    iso = [cache.get_target_report(tid["isolated"], f"i{n}", "isolated") for n in range(2)]
    sh = [cache.get_target_report(tid["shared"], f"s{n}", "shared") for n in range(2)]
    cow = [cache.get_target_report(tid["cow"], f"c{n}", "copy-on-write") for n in range(2)]
    assert [r.downloaded for r in iso] == [True, True]
    assert [r.downloaded for r in sh] == [True, False]
    assert [r.downloaded for r in cow] == [True, False]
    for r in iso + sh + cow:
        assert tree_digest(Path(r.path)) == want
    assert Path(cache.get_target(fid, "f1", "copy-on-write")).read_bytes() == f.read_bytes()

    if settings.storage_backend == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        gets = {m: server.get_count(f"{settings.s3_bucket}/{t}/target") for m, t in tid.items()}
        assert gets == {"isolated": 2, "shared": 1, "cow": 1}
        assert server.get_count(f"{settings.s3_bucket}/{fid}/target") == 1
    assert cache.index.counters().get("downloads") == 5
