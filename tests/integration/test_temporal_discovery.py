"""Workflow package discovery and the pieces of the Temporal layer that need no server:
metadata validation, error mapping of the activities, host queue names, runner helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.temporal import FIXTURE_WORKFLOWS

from forgespace.errors import (
    InvalidIdError,
    InvalidModeError,
    LockTimeoutError,
    StorageError,
    TargetNotFoundError,
    UnsafeArchiveError,
    WorkflowMetadataError,
)
from forgespace.temporal.activities import host_task_queue, to_application_error
from forgespace.temporal.discovery import discover, load_metadata, resolve_mode, workflow_mode
from forgespace.temporal.runner import RunInputError, parse_params, sarif_paths


def write_meta(path: Path, body: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "metadata.yaml"
    meta.write_text(body)
    return meta


def test_missing_workspace_isolation_means_isolated(tmp_path: Path) -> None:
    meta = load_metadata(write_meta(tmp_path / "w", "name: w\nversion: 1.0\n"))
    assert meta.workspace_isolation == "isolated"
    assert meta.version == "1.0"
    assert meta.default_parameters == {} and meta.parameters == {}


@pytest.mark.parametrize("bad", ["isolate", "Shared", "cow", "''"])
def test_unknown_workspace_isolation_names_file_value_and_allowed(tmp_path: Path, bad: str) -> None:
    meta = write_meta(tmp_path / "w", f"name: w\nworkspace_isolation: {bad}\n")
    with pytest.raises(WorkflowMetadataError) as ei:
        load_metadata(meta)
    msg = str(ei.value)
    assert str(meta) in msg
    assert "workspace_isolation" in msg
    assert "isolated, shared, copy-on-write" in msg


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("- just\n- a list\n", "must be a mapping"),
        ("version: 1\n", "name"),
        ("name: w\ndefault_parameters: [1, 2]\n", "default_parameters"),
        ("name: [unclosed\n", "cannot read"),
    ],
)
def test_malformed_metadata_is_a_named_error(tmp_path: Path, body: str, needle: str) -> None:
    meta = write_meta(tmp_path / "w", body)
    with pytest.raises(WorkflowMetadataError, match=needle) as ei:
        load_metadata(meta)
    assert str(meta) in str(ei.value)


def test_discover_loads_workflow_and_activities_and_gives_modes() -> None:
    pkgs = {p.name: p for p in discover([FIXTURE_WORKFLOWS], bundled=False, load=True)}
    assert {n: p.workspace_isolation for n, p in pkgs.items()} == {
        "fs_marker_copy_on_write": "copy-on-write",
        "fs_marker_isolated": "isolated",
        "fs_marker_shared": "shared",
    }
    for p in pkgs.values():
        assert p.workflow is not None
        assert p.workflow.__temporal_workflow_definition.name == p.name  # type: ignore[attr-defined]
        assert [a.__temporal_activity_definition.name for a in p.activities] == [
            "fixture_inspect_workspace"
        ]
    assert workflow_mode("fs_marker_shared", [FIXTURE_WORKFLOWS], bundled=False) == "shared"


def test_duplicate_names_and_duplicate_workflow_types_are_refused(tmp_path: Path) -> None:
    dirs = tmp_path / "wfs"
    shutil.copytree(FIXTURE_WORKFLOWS / "fs_marker_shared", dirs / "copy_a")
    with pytest.raises(WorkflowMetadataError, match="two workflow packages are named"):
        discover([FIXTURE_WORKFLOWS, dirs], bundled=False)
    # A metadata name other than the @workflow.defn name is mapped to it...
    meta = dirs / "copy_a" / "metadata.yaml"
    meta.write_text(meta.read_text().replace("name: fs_marker_shared", "name: renamed_wf"))
    [pkg] = discover([dirs], bundled=False, load=True)
    assert (pkg.name, pkg.workflow_type) == ("renamed_wf", "fs_marker_shared")
    # ...but two packages registering one Temporal workflow type on a worker are refused.
    with pytest.raises(WorkflowMetadataError, match="both define the Temporal workflow type"):
        discover([FIXTURE_WORKFLOWS, dirs], bundled=False, load=True)


def test_missing_workflows_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowMetadataError, match="does not exist"):
        discover([tmp_path / "nope"], bundled=False)


def test_mode_override_is_validated(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_mode("shared", None) == "shared"
    with caplog.at_level("WARNING", logger="forgespace.temporal.discovery"):
        assert resolve_mode("shared", "shared", workflow="w") == "shared"
        assert caplog.records == []  # the metadata's own mode: nothing is overridden
        assert resolve_mode("shared", "isolated", workflow="w", source="--isolation") == "isolated"
    assert [r.getMessage() for r in caplog.records] == [
        "workflow w: workspace_isolation isolated (--isolation) overrides metadata.yaml's shared"
    ]
    with pytest.raises(InvalidModeError, match="'isolate'"):
        resolve_mode("shared", "isolate")


@pytest.mark.parametrize(
    ("exc", "non_retryable"),
    [
        (TargetNotFoundError("no object t1"), True),
        (InvalidIdError("bad id"), True),
        (InvalidModeError("bad mode"), True),
        (UnsafeArchiveError("escapes"), True),
        (StorageError("503 from store", transient=True), False),
        (StorageError("access denied"), True),
        (LockTimeoutError("waited 30m for lock held by pid 7"), False),
    ],
)
def test_activity_errors_carry_their_type_and_retryability(
    exc: Exception, non_retryable: bool
) -> None:
    app = to_application_error(exc)
    assert app.type == type(exc).__name__
    assert app.non_retryable is non_retryable
    assert app.message == str(exc)


def test_host_queue_is_per_host_and_cache_dir(tmp_path: Path) -> None:
    a = host_task_queue("forgespace", tmp_path / "a", "h1")
    assert a == host_task_queue("forgespace", tmp_path / "a" / ".." / "a", "h1")
    assert a != host_task_queue("forgespace", tmp_path / "b", "h1")
    assert a != host_task_queue("forgespace", tmp_path / "a", "h2")
    assert a.startswith("forgespace@h1-")


def test_parse_params_and_sarif_paths() -> None:
    assert parse_params(["n=3", "flag=true", "name=abc", "x=1.5", "eq=a=b"]) == {
        "n": 3,
        "flag": True,
        "name": "abc",
        "x": 1.5,
        "eq": "a=b",
    }
    with pytest.raises(RunInputError, match="KEY=VALUE"):
        parse_params(["novalue"])
    assert sarif_paths(Path("o/r.sarif"), ["a"]) == [Path("o/r.sarif")]
    assert sarif_paths(Path("o/r.json"), ["a", "b"]) == [Path("o/r-a.json"), Path("o/r-b.json")]
