"""Workflow packages: discovery, metadata.yaml validation, finding the workflow and activities.

A package is a folder with ``metadata.yaml`` (FuzzForge's format), ``workflow.py`` and
optionally ``activities.py``, written the way FuzzForge writes them:

- the workflow is ``WORKFLOW`` when ``workflow.py`` exports it, otherwise the one
  ``@workflow.defn`` class defined in ``workflow.py`` (several are an error naming them). Its
  Temporal type name is whatever its ``@workflow.defn`` says (the class name when it says
  nothing); ``forgespace run NAME`` takes the metadata ``name`` and maps it to that type;
- the activities are ``ACTIVITIES`` when ``activities.py`` exports it, otherwise every
  ``@activity.defn`` function defined in ``activities.py``.

Bundled packages live in ``forgespace/workflows/<name>/``; more come from ``--workflows-dir``
folders, and a user package named like a bundled one replaces it (with a warning). Folders whose
name starts with ``_`` or ``.`` are not packages.

metadata.yaml is the one source of truth for a workflow's ``workspace_isolation``: it is
validated at start-up (an unknown value stops the worker with ``WorkflowMetadataError`` naming
the file, the value and the allowed values; a missing one means ``isolated``). Its
``parameters`` must be a valid JSON Schema (``forgespace.temporal.parameters`` validates runs'
parameters against it).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from forgespace.errors import WorkflowMetadataError
from forgespace.layout import IsolationMode

ALLOWED_MODES = tuple(m.value for m in IsolationMode)
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "workflows"
BUNDLED_PACKAGE = "forgespace.workflows"

log = logging.getLogger(__name__)


class WorkflowMetadata(BaseModel):
    """The validated content of a metadata.yaml (unknown extra keys are kept)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    version: str = "0.0.0"
    vertical: str = ""
    description: str = ""
    workspace_isolation: str = IsolationMode.ISOLATED.value
    default_parameters: dict[str, Any] = {}
    parameters: dict[str, Any] = {}

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        # `version: 1.0` in YAML is a float; keep it as written.
        return str(v) if isinstance(v, int | float) else v

    @field_validator("workspace_isolation", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        if v is None:
            return IsolationMode.ISOLATED.value
        if v not in ALLOWED_MODES:
            raise ValueError(f"invalid value {v!r}; allowed values are {', '.join(ALLOWED_MODES)}")
        return v

    @field_validator("default_parameters", "parameters", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be empty")
        return v


@dataclass
class WorkflowPackage:
    """One discovered workflow package (``workflow``/``activities`` set once loaded)."""

    name: str
    directory: Path
    metadata: WorkflowMetadata
    module_prefix: str
    bundled: bool
    workflow: type | None = None
    activities: list[Any] = field(default_factory=list)

    @property
    def workspace_isolation(self) -> str:
        return self.metadata.workspace_isolation

    @property
    def workflow_type(self) -> str:
        """The Temporal workflow type to start (its ``@workflow.defn`` name once loaded)."""
        defn = getattr(self.workflow, "__temporal_workflow_definition", None)
        return str(defn.name) if defn is not None and defn.name else self.name

    @property
    def takes_target_id(self) -> bool:
        """Whether the run method takes ``target_id`` (FuzzForge style: positional arguments
        ``[target_id, *parameters]``) rather than one ``WorkflowRequest``."""
        params = self._run_parameters()
        return bool(params) and params[0].name == "target_id"

    def run_arguments(self) -> tuple[list[str] | None, dict[str, Any]]:
        """The run method's parameters after ``target_id``: their names (``None`` when it
        takes ``*args``/``**kwargs``, i.e. any) and the Python defaults they declare."""
        params = self._run_parameters()[1:]
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            names = None
        else:
            names = [p.name for p in params]
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        return names, defaults

    def _run_parameters(self) -> list[inspect.Parameter]:
        defn = getattr(self.workflow, "__temporal_workflow_definition", None)
        run_fn = getattr(defn, "run_fn", None)
        if run_fn is None:
            return []
        params = list(inspect.signature(run_fn).parameters.values())
        return params[1:]  # self

    def summary(self) -> dict[str, str]:
        """The entry `forgespace workflows --json` prints."""
        m = self.metadata
        return {
            "name": m.name,
            "version": m.version,
            "vertical": m.vertical,
            "workspace_isolation": m.workspace_isolation,
            "description": m.description,
        }


def load_metadata(path: Path) -> WorkflowMetadata:
    """Parse and validate one metadata.yaml; WorkflowMetadataError names the file and field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise WorkflowMetadataError(f"{path}: cannot read workflow metadata: {exc}") from exc
    if not isinstance(raw, dict):
        raise WorkflowMetadataError(
            f"{path}: workflow metadata must be a mapping, got {type(raw).__name__}"
        )
    try:
        meta = WorkflowMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}")
        raise WorkflowMetadataError(f"{path}: {'; '.join(problems)}") from None
    from forgespace.temporal.parameters import check_schema

    check_schema(meta.parameters, where=f"{path}: parameters")
    return meta


def _package_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        d
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(("_", ".")) and (d / "metadata.yaml").is_file()
    )


def discover(
    workflows_dirs: Sequence[str | Path] = (), *, bundled: bool = True, load: bool = False
) -> list[WorkflowPackage]:
    """All workflow packages: bundled ones (unless ``bundled=False``) then each directory's.

    Metadata is always validated; ``load=True`` also imports WORKFLOW and ACTIVITIES.
    Two packages with the same workflow name are an error.
    """
    found: list[WorkflowPackage] = []
    roots: list[tuple[Path, bool]] = [(BUNDLED_DIR, True)] if bundled else []
    for d in workflows_dirs:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise WorkflowMetadataError(f"workflows directory {d} does not exist")
        roots.append((p, False))
    for root, is_bundled in roots:
        for pkg_dir in _package_dirs(root):
            meta = load_metadata(pkg_dir / "metadata.yaml")
            prefix = f"{BUNDLED_PACKAGE}.{pkg_dir.name}" if is_bundled else pkg_dir.name
            found.append(WorkflowPackage(meta.name, pkg_dir, meta, prefix, is_bundled))
    found = _user_replaces_bundled(found)
    seen: dict[str, WorkflowPackage] = {}
    for pkg in found:
        if pkg.name in seen:
            raise WorkflowMetadataError(
                f"two workflow packages are named {pkg.name!r}: "
                f"{seen[pkg.name].directory} and {pkg.directory}"
            )
        seen[pkg.name] = pkg
    if load:
        for pkg in found:
            load_package(pkg)
        _check_workflow_types(found)
    return found


def _user_replaces_bundled(found: list[WorkflowPackage]) -> list[WorkflowPackage]:
    """Drop each bundled package that a user package of the same name replaces (warning)."""
    user = {p.name: p for p in found if not p.bundled}
    out = []
    for pkg in found:
        replacement = user.get(pkg.name)
        if pkg.bundled and replacement is not None:
            log.warning(
                "workflow %s: the package in %s replaces the bundled one",
                pkg.name,
                replacement.directory,
            )
            continue
        out.append(pkg)
    return out


def _check_workflow_types(packages: Sequence[WorkflowPackage]) -> None:
    """One worker registers each Temporal workflow type once."""
    by_type: dict[str, WorkflowPackage] = {}
    for pkg in packages:
        other = by_type.setdefault(pkg.workflow_type, pkg)
        if other is not pkg:
            raise WorkflowMetadataError(
                f"workflows {other.name} ({other.directory / 'workflow.py'}) and {pkg.name} "
                f"({pkg.directory / 'workflow.py'}) both define the Temporal workflow type "
                f"{pkg.workflow_type!r}; give one a distinct @workflow.defn(name=...)"
            )


def _import(pkg: WorkflowPackage, module: str) -> Any:
    name = f"{pkg.module_prefix}.{module}"
    if not pkg.bundled:
        # The workflow sandbox re-imports workflow modules by name, so user packages must be
        # importable by name: their parent folder goes on sys.path.
        parent = str(pkg.directory.parent)
        if parent not in sys.path:
            sys.path.append(parent)
        if not pkg.directory.name.isidentifier():
            raise WorkflowMetadataError(
                f"{pkg.directory}: a workflow package folder name must be a Python identifier"
            )
        spec = importlib.util.find_spec(pkg.module_prefix)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if spec is None or str(pkg.directory) not in [str(Path(p).resolve()) for p in locations]:
            raise WorkflowMetadataError(
                f"{pkg.directory}: the folder name {pkg.directory.name!r} clashes with an "
                "importable module elsewhere; rename the folder"
            )
    try:
        return importlib.import_module(name)
    except WorkflowMetadataError:
        raise
    except Exception as exc:
        raise WorkflowMetadataError(
            f"workflow package {pkg.name}: cannot import {pkg.directory / (module + '.py')}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _defined_here(module: Any, attr: str) -> list[tuple[str, Any]]:
    """Module attributes carrying ``attr`` (a Temporal definition) and defined in ``module``
    itself: what it merely imports is another package's (or forgespace's) to register."""
    return [
        (name, obj)
        for name, obj in vars(module).items()
        if getattr(obj, attr, None) is not None
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _find_workflow(pkg: WorkflowPackage, wf_mod: Any) -> type:
    where = pkg.directory / "workflow.py"
    wf = getattr(wf_mod, "WORKFLOW", None)
    if wf is not None:
        if getattr(wf, "__temporal_workflow_definition", None) is None:
            raise WorkflowMetadataError(f"{where}: WORKFLOW is {wf!r}, not a @workflow.defn class")
        return wf  # type: ignore[no-any-return]
    found = _defined_here(wf_mod, "__temporal_workflow_definition")
    classes = [obj for _, obj in found if inspect.isclass(obj)]
    if not classes:
        raise WorkflowMetadataError(
            f"{where}: defines no @workflow.defn class (and exports no WORKFLOW)"
        )
    if len(classes) > 1:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise WorkflowMetadataError(
            f"{where}: defines several @workflow.defn classes ({names}); keep one per package "
            "or export the one to serve as WORKFLOW"
        )
    return classes[0]  # type: ignore[no-any-return]


def _find_activities(pkg: WorkflowPackage, act_mod: Any) -> list[Any]:
    listed = getattr(act_mod, "ACTIVITIES", None)
    if listed is None:
        return [obj for _, obj in _defined_here(act_mod, "__temporal_activity_definition")]
    acts = list(listed)
    for a in acts:
        if getattr(a, "__temporal_activity_definition", None) is None:
            raise WorkflowMetadataError(
                f"{pkg.directory / 'activities.py'}: ACTIVITIES holds {a!r}, "
                "which is not an @activity.defn function"
            )
    return acts


def load_package(pkg: WorkflowPackage) -> WorkflowPackage:
    """Import the package's workflow class and activities (see the module docstring)."""
    if pkg.workflow is not None:
        return pkg
    wf = _find_workflow(pkg, _import(pkg, "workflow"))
    acts: list[Any] = []
    if (pkg.directory / "activities.py").is_file():
        acts = _find_activities(pkg, _import(pkg, "activities"))
    pkg.workflow = wf
    pkg.activities = acts
    return pkg


def find_package(packages: Iterable[WorkflowPackage], name: str) -> WorkflowPackage:
    """The package named ``name``; WorkflowMetadataError listing the known names otherwise."""
    pkgs = list(packages)
    for p in pkgs:
        if p.name == name:
            return p
    known = ", ".join(sorted(p.name for p in pkgs)) or "none"
    raise WorkflowMetadataError(f"unknown workflow {name!r}: discovered workflows are {known}")


def workflow_mode(
    name: str, workflows_dirs: Sequence[str | Path] = (), *, bundled: bool = True
) -> str:
    """A workflow's workspace_isolation, from its metadata.yaml (the one source of truth)."""
    return find_package(discover(workflows_dirs, bundled=bundled), name).workspace_isolation


def resolve_mode(
    metadata_mode: str, override: str | None, *, workflow: str = "", source: str = "override"
) -> str:
    """The mode a run uses: ``override`` when given (validated, logged), else the metadata's."""
    if override is None or override == "":
        return metadata_mode
    mode = IsolationMode.parse(override).value
    if mode != metadata_mode:
        log.warning(
            "workflow %s: workspace_isolation %s (%s) overrides metadata.yaml's %s",
            workflow,
            mode,
            source,
            metadata_mode,
        )
    return mode
