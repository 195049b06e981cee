"""Workflows written the way the design document and FuzzForge write them run unchanged:
discovery without exports, the positional start contract, schema validation before upload,
honest cache figures, and (in test_workflow_compat_hosts.py) host affinity on two hosts."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.s3server import env_for
from support.temporal import WorkerProcess, cli_command
from temporalio.client import Client

from forgespace.config import Settings
from forgespace.errors import WorkflowMetadataError, WorkflowParameterError
from forgespace.storage import open_store
from forgespace.temporal.api import CACHE_MEMO_KEY
from forgespace.temporal.devserver import DevServer
from forgespace.temporal.discovery import discover, find_package, load_package
from forgespace.temporal.parameters import load_param_file, resolve_parameters, start_arguments

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"
EXAMPLE_ARGS = ["--workflows-dir", str(EXAMPLES)]

# The design document's example, as the design shows it (the test writes it into packages).
DESIGN_EXAMPLE = """
from datetime import timedelta
from typing import Any, Dict

from temporalio import workflow


@workflow.defn
class MyWorkflow:
    @workflow.run
    async def run(self, target_id: str) -> Dict[str, Any]:
        run_id = workflow.info().run_id
        target_path = await workflow.execute_activity(
            "get_target", args=[target_id, run_id, "isolated"], start_to_close_timeout=timedelta(minutes=5))
        # ... workflow logic ...
        await workflow.execute_activity(
            "cleanup_cache", args=[target_path, "isolated"], start_to_close_timeout=timedelta(minutes=1))
"""


def make_package(root: Path, name: str, workflow_py: str, meta: str = "", acts: str = "") -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "metadata.yaml").write_text(meta or f"name: {name}\nworkspace_isolation: isolated\n")
    (pkg / "workflow.py").write_text(workflow_py)
    if acts:
        (pkg / "activities.py").write_text(acts)
    return pkg


def cli(settings: Settings, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = env_for(settings)
    env.pop("TEMPORAL_ADDRESS", None)  # embedded dev server + in-process worker
    env["COLUMNS"] = "1000"
    return subprocess.run(
        cli_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def stored_objects(settings: Settings) -> list[Path]:
    root = settings.storage_dir
    return sorted(p for p in root.rglob("target")) if root.exists() else []


# --- discovery ------------------------------------------------------------------------------


def test_examples_are_found_without_exports_and_keep_their_class_names() -> None:
    pkgs = {p.name: p for p in discover([EXAMPLES], bundled=False, load=True)}
    mine, scanner = pkgs["my_workflow"], pkgs["file_scanner"]
    assert (mine.workflow_type, scanner.workflow_type) == ("MyWorkflow", "FileScannerWorkflow")
    assert mine.takes_target_id and scanner.takes_target_id
    assert [a.__temporal_activity_definition.name for a in mine.activities] == [
        "inventory_workspace"
    ]
    assert [a.__temporal_activity_definition.name for a in scanner.activities] == ["scan_files"]
    assert (mine.workspace_isolation, scanner.workspace_isolation) == ("isolated", "shared")


def test_design_example_verbatim_loads(tmp_path: Path) -> None:
    make_package(tmp_path, "verbatim_wf", DESIGN_EXAMPLE)
    [pkg] = discover([tmp_path], bundled=False, load=True)
    assert pkg.workflow_type == "MyWorkflow" and pkg.takes_target_id
    assert pkg.activities == []


def test_activities_imported_from_elsewhere_are_not_registered_twice(tmp_path: Path) -> None:
    acts = (
        "from temporalio import activity\n"
        "from forgespace.workflows.atheris_fuzzing.activities import atheris_fuzz\n\n"
        "@activity.defn(name='own_step')\ndef own(x: str) -> str:\n    return x\n\n"
        "@activity.defn\nasync def plain_named(x: str) -> str:\n    return x\n"
    )
    make_package(tmp_path, "acts_wf", DESIGN_EXAMPLE, acts=acts)
    [pkg] = discover([tmp_path], bundled=False, load=True)
    assert sorted(a.__temporal_activity_definition.name for a in pkg.activities) == [
        "own_step",
        "plain_named",
    ]


def test_two_workflow_classes_are_an_error_naming_them(tmp_path: Path) -> None:
    # Two valid classes (a subclass without its own @workflow.run would already fail to import).
    second = DESIGN_EXAMPLE + (
        "\n\n@workflow.defn\nclass OtherWorkflow:\n    @workflow.run\n"
        "    async def run(self, target_id: str) -> None:\n        return None\n"
    )
    pkg = make_package(tmp_path, "two_wf", second)
    with pytest.raises(WorkflowMetadataError) as ei:
        discover([tmp_path], bundled=False, load=True)
    msg = str(ei.value)
    assert str(pkg / "workflow.py") in msg
    assert "defines several @workflow.defn classes (MyWorkflow, OtherWorkflow)" in msg
    assert "export the one to serve as WORKFLOW" in msg
    # Exporting one settles it.
    make_package(tmp_path / "b", "two_wf_exported", second + "\nWORKFLOW = OtherWorkflow\n")
    [chosen] = discover([tmp_path / "b"], bundled=False, load=True)
    assert chosen.workflow_type == "OtherWorkflow"


def test_no_workflow_class_and_import_errors_name_the_package(tmp_path: Path) -> None:
    make_package(tmp_path / "a", "empty_wf", "X = 1\n")
    with pytest.raises(WorkflowMetadataError, match=r"defines no @workflow\.defn class"):
        discover([tmp_path / "a"], bundled=False, load=True)
    make_package(tmp_path / "b", "broken_wf", "import toolbox_not_installed\n")
    with pytest.raises(WorkflowMetadataError) as ei:
        discover([tmp_path / "b"], bundled=False, load=True)
    msg = str(ei.value)
    assert "broken_wf" in msg and "toolbox_not_installed" in msg
    assert "ModuleNotFoundError" in msg


def test_exports_that_are_not_temporal_definitions_are_named(tmp_path: Path) -> None:
    make_package(tmp_path / "a", "bad_export_wf", DESIGN_EXAMPLE + "\nWORKFLOW = 42\n")
    with pytest.raises(WorkflowMetadataError, match=r"WORKFLOW is 42, not a @workflow\.defn class"):
        discover([tmp_path / "a"], bundled=False, load=True)
    acts = "def helper(x):\n    return x\n\nACTIVITIES = [helper]\n"
    pkg = make_package(tmp_path / "b", "bad_acts_wf", DESIGN_EXAMPLE, acts=acts)
    with pytest.raises(WorkflowMetadataError) as ei:
        discover([tmp_path / "b"], bundled=False, load=True)
    msg = str(ei.value)
    assert str(pkg / "activities.py") in msg
    assert "ACTIVITIES holds <function helper" in msg
    assert "not an @activity.defn function" in msg


@pytest.mark.parametrize(
    ("folder", "needle"),
    [
        ("my-workflow", "a workflow package folder name must be a Python identifier"),
        # A folder named like an importable module would import that module instead.
        ("json", "the folder name 'json' clashes with an importable module elsewhere"),
    ],
)
def test_package_folders_that_cannot_be_imported_by_name_are_refused(
    tmp_path: Path, folder: str, needle: str
) -> None:
    meta = f"name: {folder.replace('-', '_')}_wf\n"
    pkg = make_package(tmp_path, folder, DESIGN_EXAMPLE, meta=meta)
    [found] = discover([tmp_path], bundled=False)  # metadata alone is fine
    with pytest.raises(WorkflowMetadataError) as ei:
        discover([tmp_path], bundled=False, load=True)
    assert str(ei.value).startswith(f"{pkg}: ")
    assert needle in str(ei.value)
    assert found.workflow is None and not found.takes_target_id  # not loaded: no signature


def test_run_arguments_of_a_run_method_taking_any_arguments(tmp_path: Path) -> None:
    code = (
        "from typing import Any\nfrom temporalio import workflow\n\n"
        "@workflow.defn\nclass AnyArgs:\n    @workflow.run\n"
        "    async def run(self, target_id: str, *args: Any) -> None:\n        return None\n"
    )
    make_package(tmp_path, "any_args_wf", code)
    [pkg] = discover([tmp_path], bundled=False, load=True)
    # Every parameter of metadata.yaml is passed on: the run method takes them all.
    assert pkg.run_arguments() == (None, {})
    assert start_arguments(pkg, "t1", {}) == ["t1"]
    assert load_package(pkg) is pkg and pkg.workflow is not None  # loaded once


def test_metadata_with_empty_mode_or_blank_name(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "a", "null_mode_wf", DESIGN_EXAMPLE, meta=(
        "name: null_mode_wf\nworkspace_isolation:\n"
    ))  # fmt: skip
    [found] = discover([tmp_path / "a"], bundled=False)
    assert found.directory == pkg and found.workspace_isolation == "isolated"
    make_package(tmp_path / "b", "blank_wf", DESIGN_EXAMPLE, meta="name: '  '\n")
    with pytest.raises(WorkflowMetadataError, match="name: name must not be empty"):
        discover([tmp_path / "b"], bundled=False)


def test_schema_that_is_not_json_schema_names_the_file(tmp_path: Path) -> None:
    meta = "name: bad_schema\nparameters:\n  type: object\n  properties:\n    n: {type: integr}\n"
    pkg = make_package(tmp_path, "bad_schema", DESIGN_EXAMPLE, meta=meta)
    with pytest.raises(WorkflowMetadataError) as ei:
        discover([tmp_path], bundled=False)
    msg = str(ei.value)
    assert str(pkg / "metadata.yaml") in msg
    assert "not a valid JSON Schema" in msg and "integr" in msg


def test_user_package_replaces_bundled_one_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = "name: security_assessment\nworkspace_isolation: shared\n"
    pkg = make_package(tmp_path, "my_security_assessment", DESIGN_EXAMPLE, meta=meta)
    with caplog.at_level(logging.WARNING):
        found = find_package(discover([tmp_path], bundled=True), "security_assessment")
    assert found.directory == pkg and not found.bundled
    assert "replaces the bundled one" in caplog.text


# --- parameters -----------------------------------------------------------------------------


def scanner() -> Any:
    return find_package(discover([EXAMPLES], bundled=False, load=True), "file_scanner")


def test_defaults_come_from_default_parameters_then_schema_defaults() -> None:
    assert resolve_parameters(scanner(), {}) == {
        "patterns": ["*"],
        "max_file_size": 10485760,
        "check_sensitive": True,
    }
    assert resolve_parameters(scanner(), {"max_file_size": 5})["max_file_size"] == 5


@pytest.mark.parametrize(
    ("given", "needles"),
    [
        ({"max_file_size": "abc"}, ["max_file_size", '"abc"', "integer"]),
        ({"max_file_size": 0}, ["max_file_size=0", "minimum 1"]),
        ({"patterns": "*.py"}, ["patterns", "array"]),
        ({"check_sensitive": "maybe"}, ["check_sensitive", "boolean"]),
        ({"max_filesize": 3}, ["'max_filesize'", "patterns, max_file_size, check_sensitive"]),
    ],
)
def test_bad_parameters_name_the_parameter_value_and_what_is_accepted(
    given: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(WorkflowParameterError) as ei:
        resolve_parameters(scanner(), given)
    for needle in needles:
        assert needle in str(ei.value)


def test_enum_and_maximum_from_the_schema_are_enforced(tmp_path: Path) -> None:
    meta = (
        "name: enum_wf\nparameters:\n  type: object\n  properties:\n"
        "    mode: {type: string, enum: [fast, deep]}\n"
        "    depth: {type: integer, maximum: 3}\n"
    )
    make_package(tmp_path, "enum_wf", DESIGN_EXAMPLE, meta=meta)
    [pkg] = discover([tmp_path], bundled=False)
    assert resolve_parameters(pkg, {"mode": "deep", "depth": 3}) == {"mode": "deep", "depth": 3}
    with pytest.raises(WorkflowParameterError, match='one of "fast", "deep"'):
        resolve_parameters(pkg, {"mode": "slow"})
    with pytest.raises(WorkflowParameterError, match="maximum 3"):
        resolve_parameters(pkg, {"depth": 4})


def test_a_type_list_and_a_missing_required_parameter_are_explained(tmp_path: Path) -> None:
    meta = (
        "name: required_wf\nparameters:\n  type: object\n  required: [target_kind]\n"
        "  properties:\n    limit: {type: [integer, 'null']}\n"
        "    target_kind: {type: string}\n"
    )
    make_package(tmp_path, "required_wf", DESIGN_EXAMPLE, meta=meta)
    [pkg] = discover([tmp_path], bundled=False)
    with pytest.raises(WorkflowParameterError) as ei:
        resolve_parameters(pkg, {"limit": "ten"})
    msg = str(ei.value)
    assert '--param limit="ten"' in msg and "(accepted: integer or null)" in msg
    # Not about one value: the schema's own words.
    assert "'target_kind' is a required property" in msg
    assert resolve_parameters(pkg, {"target_kind": "dir", "limit": None}) == {
        "target_kind": "dir",
        "limit": None,
    }


def test_without_a_schema_the_default_parameters_are_taken_as_they_are(tmp_path: Path) -> None:
    meta = "name: no_schema_wf\ndefault_parameters:\n  depth: 2\n"
    make_package(tmp_path, "no_schema_wf", DESIGN_EXAMPLE, meta=meta)
    [pkg] = discover([tmp_path], bundled=False)
    assert resolve_parameters(pkg, {}) == {"depth": 2}
    # Without properties nothing can be passed: a --param is a typo until the schema names it.
    with pytest.raises(WorkflowParameterError) as ei:
        resolve_parameters(pkg, {"depth": 3})
    assert "has no parameter 'depth'; its parameters (metadata.yaml) are: none" in str(ei.value)


def test_start_arguments_follow_the_schema_order_and_the_run_signature(tmp_path: Path) -> None:
    wf = (
        "from temporalio import workflow\n\n@workflow.defn\nclass P:\n    @workflow.run\n"
        "    async def run(self, target_id: str, b: int = 7, a: str = 'x') -> dict:\n"
        "        return {}\n"
    )
    meta = (
        "name: order_wf\nparameters:\n  type: object\n  properties:\n"
        "    b: {type: integer}\n    volume_mode: {type: string, default: ro}\n"
        "    a: {type: string}\n"
    )
    make_package(tmp_path, "order_wf", wf, meta=meta)
    [pkg] = discover([tmp_path], bundled=False, load=True)
    params = resolve_parameters(pkg, {"a": "given"})
    # volume_mode is not a run argument; b has no value anywhere: the run method's default.
    assert start_arguments(pkg, "t1", params) == ["t1", 7, "given"]


def test_param_file_yaml_or_json_mapping(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("max_file_size: 12\npatterns: ['*.py']\n")
    (tmp_path / "p.json").write_text('{"check_sensitive": false}')
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert load_param_file(tmp_path / "p.yaml") == {"max_file_size": 12, "patterns": ["*.py"]}
    assert load_param_file(tmp_path / "p.json") == {"check_sensitive": False}
    with pytest.raises(WorkflowParameterError, match="expected a mapping"):
        load_param_file(tmp_path / "list.yaml")
    with pytest.raises(WorkflowParameterError, match="cannot read"):
        load_param_file(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing set here\n")
    assert load_param_file(tmp_path / "empty.yaml") == {}


# --- forgespace run, embedded ---------------------------------------------------------------


def make_target(root: Path) -> Path:
    proj = root / "proj"
    (proj / "deploy").mkdir(parents=True)
    (proj / "hello.txt").write_text("hello\n")
    (proj / ".env").write_text("TOKEN=not-a-real-one\n")
    (proj / "deploy" / "id_rsa").write_text("not a real key\n")
    return proj


@pytest.mark.integration
def test_design_example_runs_with_forgespace_run(settings: Settings, tmp_path: Path) -> None:
    proj = make_target(tmp_path)
    proc = cli(settings, "run", "my_workflow", str(proj), "--runs", "3", "--json", *EXAMPLE_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    tid = report["target_id"]
    assert report["workflow"] == "my_workflow"
    assert report["workspace_isolation"] == "isolated"
    # Isolated: every run downloaded its own copy; figures come from each run's get_target.
    assert report["cache"] == {"downloads": 3, "hits": 0}
    assert len({r["run_id"] for r in report["runs"]}) == 3
    for run in report["runs"]:
        assert run["status"] == "completed" and run["error"] is None
        # run_id is the Temporal run id the workflow named its workspace after.
        assert run["workspace"] == str(settings.cache_dir / tid / run["run_id"] / "workspace")
        result = run["result"]  # the whole return value: the inventory activity's
        assert result["workspace"] == run["workspace"]
        assert (result["files"], result["bytes"]) == (3, 6 + 21 + 15)
        assert result["other_runs_markers"] == []  # no other run wrote into this workspace
        assert not (settings.cache_dir / tid / run["run_id"]).exists(), "cleanup_cache ran"


@pytest.mark.integration
def test_fuzzforge_style_shared_scanner_one_download(settings: Settings, tmp_path: Path) -> None:
    proj = make_target(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("patterns: ['*']\nmax_file_size: 1000\n")
    proc = cli(
        settings,
        "run",
        "file_scanner",
        str(proj),
        "--runs",
        "3",
        "--param-file",
        str(params),
        "--param",
        "max_file_size=4",  # --param wins over the file: no file is read for its hash
        "--json",
        *EXAMPLE_ARGS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    tid = report["target_id"]
    assert report["workspace_isolation"] == "shared"
    assert report["cache"] == {"downloads": 1, "hits": 2}
    for run in report["runs"]:
        assert run["status"] == "completed"
        assert run["workspace"] == str(settings.cache_dir / tid / "workspace")
        assert run["findings"] == 2
        result = run["result"]
        assert result["status"] == "success" and result["target_path"] == run["workspace"]
        assert sorted(f["file"] for f in result["findings"]) == [".env", "deploy/id_rsa"]
        assert all(f["sha256"] is None for f in result["findings"])  # max_file_size=4 applied
        assert Path(result["results_url"]).is_file()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--param", "max_file_size=abc"], ["max_file_size", '"abc"', "integer"]),
        (["--param", "max_filesize=3"], ["'max_filesize'", "max_file_size"]),
        (["--isolation", "isolated"], ["chooses its workspace isolation", "shared"]),
    ],
    ids=["wrong-type", "unknown-name", "isolation-on-hard-coded-mode"],
)
def test_bad_input_exits_2_and_uploads_nothing(
    settings: Settings, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    proj = make_target(tmp_path)
    proc = cli(settings, "run", "file_scanner", str(proj), *args, *EXAMPLE_ARGS, timeout=60)
    assert proc.returncode == 2, proc.stderr
    for needle in needles:
        assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert stored_objects(settings) == []


@pytest.mark.integration
def test_package_errors_exit_2_naming_what_is_wrong(settings: Settings, tmp_path: Path) -> None:
    proj = make_target(tmp_path)
    wfs = tmp_path / "wfs"
    two = DESIGN_EXAMPLE + "\n\n@workflow.defn\nclass SecondWorkflow(MyWorkflow):\n    pass\n"
    make_package(wfs, "two_classes", two)
    proc = cli(settings, "run", "two_classes", str(proj), "--workflows-dir", str(wfs), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "MyWorkflow" in proc.stderr and "SecondWorkflow" in proc.stderr
    shutil.rmtree(wfs / "two_classes")
    meta = "name: bad_schema\nparameters: {type: object, properties: {n: {minimum: ten}}}\n"
    make_package(wfs, "bad_schema", DESIGN_EXAMPLE, meta=meta)
    proc = cli(settings, "run", "bad_schema", str(proj), "--workflows-dir", str(wfs), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert str(wfs / "bad_schema" / "metadata.yaml") in proc.stderr
    assert "not a valid JSON Schema" in proc.stderr
    proc = cli(settings, "run", "no_such_wf", str(proj), *EXAMPLE_ARGS, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "file_scanner" in proc.stderr and "my_workflow" in proc.stderr
    assert "atheris_fuzzing" in proc.stderr  # bundled ones are listed too
    assert stored_objects(settings) == []


@pytest.mark.integration
def test_workflows_info_shows_mode_and_parameters(settings: Settings) -> None:
    proc = cli(settings, "workflows", "info", "file_scanner", "--json", *EXAMPLE_ARGS)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["workspace_isolation"] == "shared"
    by_name = {p["name"]: p for p in info["parameters"]}
    assert list(by_name) == ["patterns", "max_file_size", "check_sensitive"]
    assert by_name["max_file_size"]["accepts"] == "integer, minimum 1"
    assert by_name["max_file_size"]["default"] == 10485760
    assert by_name["check_sensitive"]["default"] is True  # the schema's default
    proc = cli(settings, "workflows", "info", "file_scanner", *EXAMPLE_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "workspace_isolation: shared" in proc.stdout
    assert "max_file_size (integer, minimum 1) = 10485760" in proc.stdout


@pytest.mark.integration
def test_worker_with_fuzzforge_variables_serves_its_vertical_on_vertical_queue(
    settings: Settings,
    temporal_server: DevServer,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    """WORKER_VERTICAL / WORKER_TASK_QUEUE / MAX_CONCURRENT_ACTIVITIES / LOG_LEVEL are read;
    only the vertical's packages are served, and a run started FuzzForge-style on
    `{vertical}-queue` (positional target_id) completes with its get_target recorded."""
    vertical = f"v{uuid.uuid4().hex[:8]}"
    wfs = tmp_path / "wfs"
    shutil.copytree(EXAMPLES, wfs)
    meta = wfs / "my_workflow" / "metadata.yaml"
    meta.write_text(meta.read_text().replace("vertical: python", f"vertical: {vertical}"))
    env = env_for(settings.with_(temporal_address=temporal_server.address))
    env |= {
        "TEMPORAL_NAMESPACE": temporal_server.namespace,
        "WORKER_VERTICAL": vertical,
        "WORKER_TASK_QUEUE": f"q-{vertical}",
        "MAX_CONCURRENT_ACTIVITIES": "4",
        "LOG_LEVEL": "info",
    }
    log = tmp_path / "w.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cli_command("worker", "--workflows-dir", str(wfs)), env=env, stdout=f, stderr=f
        )
    w = WorkerProcess(proc, log)
    worker_processes.append(w)
    w.wait_ready()
    assert f"task queue q-{vertical}," in w.text()
    assert "workflows: my_workflow;" in w.text()  # not the bundled ones, not file_scanner

    tid = open_store(settings).upload_target(make_target(tmp_path))

    async def main() -> tuple[Any, Any]:
        client = await Client.connect(temporal_server.address, namespace=temporal_server.namespace)
        handle = await client.start_workflow(
            "MyWorkflow", args=[tid], id=f"mine-{vertical}", task_queue=f"{vertical}-queue"
        )
        result = await asyncio.wait_for(handle.result(), timeout=60)
        memo = await (await handle.describe()).memo()
        return result, memo

    result, memo = asyncio.run(main())
    assert result["files"] == 3 and Path(result["workspace"]).parent.parent.name == tid
    assert memo[CACHE_MEMO_KEY] == {"downloads": 1, "hits": 0}
    w.stop()
    assert w.proc.returncode == 0, w.text()[-2000:]

    bad = subprocess.run(
        cli_command("worker", "--workflows-dir", str(wfs)),
        env={**env, "MAX_CONCURRENT_ACTIVITIES": "many", "COLUMNS": "1000"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "MAX_CONCURRENT_ACTIVITIES 'many'" in bad.stderr
    unknown = subprocess.run(
        cli_command("worker", "--workflows-dir", str(wfs), "--vertical", "cobol"),
        env={**env, "COLUMNS": "1000"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "'cobol'" in unknown.stderr and vertical in unknown.stderr
