"""Zip-packaged artifacts (APK, AAR, JAR/WAR, IPA, wheels) stay the file they are, as FuzzForge
hands them to its tools; a plain source zip is still extracted; `upload --extract` asks for an
artifact's contents instead."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from support.cli import assert_one_line_error, cli_env, run_forgespace

from forgespace import Settings, WorkspaceCache, open_store
from forgespace.cache.archive import artifact_kind, detect_archive

ARTIFACTS = {
    "apk": ["AndroidManifest.xml", "classes.dex", "resources.arsc", "res/layout/main.xml"],
    "aar": ["AndroidManifest.xml", "classes.jar", "R.txt"],
    "jar": ["META-INF/MANIFEST.MF", "com/example/App.class", "app.properties"],
    "war": ["META-INF/MANIFEST.MF", "WEB-INF/web.xml", "index.jsp"],
    "ipa": ["Payload/Demo.app/Info.plist", "Payload/Demo.app/Demo"],
    "wheel": ["demo/__init__.py", "demo-1.0.dist-info/WHEEL", "demo-1.0.dist-info/RECORD"],
}


def make_zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.writestr(name, f"content of {name}\n")
    return path


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_an_artifact_stays_a_file_in_every_mode(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    # The file name says nothing: a neutral name, judged by content.
    blob = make_zip(tmp_path / "upload.bin", ARTIFACTS[kind])
    assert artifact_kind(blob) == ("jar" if kind == "war" else kind)
    assert detect_archive(blob) is None and detect_archive(blob, artifacts=True) == "zip"
    tid = open_store(settings).upload_target(blob)
    cache = WorkspaceCache(settings)
    for mode in ("shared", "isolated", "copy-on-write"):
        path = Path(cache.get_target(tid, f"r-{mode}", mode))
        assert path.name == "target" and path.is_file(), (mode, path)
        assert path.read_bytes() == blob.read_bytes()
        again = cache.get_target_report(tid, f"r-{mode}", mode)
        assert again.path == str(path) and not again.downloaded  # a hit, not a re-publish


def test_a_source_zip_of_a_project_that_builds_an_artifact_is_extracted(
    settings: Settings, tmp_path: Path
) -> None:
    names = [
        "build.gradle",
        "app/src/main/AndroidManifest.xml",  # nested, as in a source tree
        "app/src/main/resources/META-INF/MANIFEST.MF",
        "app/src/main/java/App.java",
    ]
    blob = make_zip(tmp_path / "src.zip", names)
    assert artifact_kind(blob) is None
    tid = open_store(settings).upload_target(blob)
    ws = Path(WorkspaceCache(settings).get_target(tid, "r1", "isolated"))
    assert ws.name == "workspace"
    java = "app/src/main/java/App.java"
    assert (ws / java).read_text() == f"content of {java}\n"


def test_upload_extract_gives_runs_the_artifacts_contents(
    settings: Settings, tmp_path: Path
) -> None:
    env = cli_env(
        dict(os.environ),
        CACHE_DIR=str(settings.cache_dir),
        STORAGE_DIR=str(settings.storage_dir),
    )
    apk = make_zip(tmp_path / "app.apk", ARTIFACTS["apk"])
    proc = run_forgespace(env, "upload", str(apk), "--extract")
    assert proc.returncode == 0, proc.stderr
    tid = proc.stdout.strip().splitlines()[-1]
    assert tid.startswith("tree-")  # the contents, as a tree
    ws = Path(WorkspaceCache(settings).get_target(tid, "r1", "shared"))
    assert sorted(p.relative_to(ws).as_posix() for p in ws.rglob("*") if p.is_file()) == sorted(
        ARTIFACTS["apk"]
    )
    plain = tmp_path / "notes.txt"
    plain.write_text("not an archive\n")
    bad = run_forgespace(env, "upload", str(plain), "--extract")
    assert_one_line_error(bad, 2, "--extract takes an archive file")
