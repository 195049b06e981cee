"""A run's parameters: metadata.yaml's JSON schema, defaults, validation, start arguments.

The one place parameters are checked, for every workflow (bundled or not): ``forgespace run``
calls ``resolve_parameters`` before anything is uploaded or started, so a bad value never
reaches the store or a worker. The schema is metadata.yaml's ``parameters`` (a JSON Schema
object with ``properties``, as FuzzForge writes it); a parameter the schema does not name is
refused even when the schema leaves ``additionalProperties`` open, so a typo never passes
silently.

Defaults: ``default_parameters`` first, then each property's ``default``.

Start arguments: a workflow whose run method takes one ``WorkflowRequest`` gets the parameters
in it; a run method taking ``target_id`` (FuzzForge style) is started with positional
arguments ``[target_id, *parameters in the order of parameters.properties]``. Properties the
run method does not declare are left out (FuzzForge's metadata lists deployment settings such
as ``volume_mode`` next to the run's own arguments), and a property with no value anywhere
gets the run method's own default (``None`` when it declares none).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from forgespace.errors import WorkflowMetadataError, WorkflowParameterError

if TYPE_CHECKING:
    from forgespace.temporal.discovery import WorkflowPackage

# Schema keywords worth showing a user as "what is accepted".
_SHOWN = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "items",
)


def check_schema(schema: Mapping[str, Any], *, where: str) -> None:
    """Raise WorkflowMetadataError (naming ``where``) unless ``schema`` is valid JSON Schema."""
    if not schema:
        return
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "(root)"
        raise WorkflowMetadataError(
            f"{where} is not a valid JSON Schema: at {at}: {exc.message}"
        ) from None
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise WorkflowMetadataError(f"{where}: properties must be a mapping of parameter names")


def properties(pkg: WorkflowPackage) -> dict[str, dict[str, Any]]:
    """metadata.yaml's ``parameters.properties``, in the file's order."""
    props = pkg.metadata.parameters.get("properties") or {}
    return {str(k): (v if isinstance(v, dict) else {}) for k, v in props.items()}


def defaults(pkg: WorkflowPackage) -> dict[str, Any]:
    """``default_parameters``, then each property's schema ``default`` where that is silent."""
    out = dict(pkg.metadata.default_parameters)
    for name, spec in properties(pkg).items():
        if name not in out and "default" in spec:
            out[name] = spec["default"]
    return out


def accepted(spec: Mapping[str, Any]) -> str:
    """What a property's schema accepts, in a few words (for error messages and `info`)."""
    parts = []
    for key in _SHOWN:
        if key in spec:
            value = spec[key]
            if key == "type" and isinstance(value, list):
                value = " or ".join(str(v) for v in value)
            elif key == "enum":
                value = "one of " + ", ".join(json.dumps(v) for v in value)
                parts.append(str(value))
                continue
            elif key == "items" and isinstance(value, Mapping):
                value = value.get("type", "any")
            parts.append(f"{key} {value}" if key != "type" else str(value))
    return ", ".join(parts) or "any value"


def resolve_parameters(pkg: WorkflowPackage, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's parameters: defaults overlaid with ``given``, validated against the schema.

    WorkflowParameterError names the parameter, the value and what the schema accepts.
    """
    from jsonschema import validators

    props = properties(pkg)
    unknown = sorted(set(given) - set(props))
    if unknown:
        known = ", ".join(props) or "none"
        raise WorkflowParameterError(
            f"workflow {pkg.name} has no parameter {', '.join(repr(u) for u in unknown)}; "
            f"its parameters (metadata.yaml) are: {known}"
        )
    merged = {**defaults(pkg), **given}
    schema = pkg.metadata.parameters
    if not schema:
        return merged
    validator = validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(merged), key=lambda e: (list(e.path), e.message))
    if not errors:
        return merged
    problems = []
    for err in errors:
        if err.path:
            name = str(err.path[0])
            value = merged.get(name)
            source = "--param" if name in given else "default"
            problems.append(
                f"{source} {name}={json.dumps(value, default=str)}: {err.message} "
                f"(accepted: {accepted(props.get(name, {}))})"
            )
        else:
            problems.append(err.message)
    raise WorkflowParameterError(
        f"invalid parameter(s) for workflow {pkg.name}: " + "; ".join(problems)
    )


@functools.cache
def _bundled_package(name: str) -> WorkflowPackage:
    from forgespace.temporal.discovery import discover, find_package

    return find_package(discover(bundled=True, load=False), name)


def bundled_parameters(workflow: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``resolve_parameters`` for a bundled workflow's activity: a run started straight through
    Temporal (not by `forgespace run`) gets the same defaults and the same checks."""
    return resolve_parameters(_bundled_package(workflow), given)


def start_arguments(pkg: WorkflowPackage, target_id: str, params: Mapping[str, Any]) -> list[Any]:
    """Positional start arguments of a FuzzForge-style workflow (see the module docstring)."""
    names, py_defaults = pkg.run_arguments()
    args: list[Any] = [target_id]
    for name in properties(pkg):
        if names is not None and name not in names:
            continue
        args.append(params[name] if name in params else py_defaults.get(name))
    return args


def load_param_file(path: Path) -> dict[str, Any]:
    """Parameters from a YAML or JSON file holding one mapping (``--param-file``)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WorkflowParameterError(f"--param-file {path}: cannot read it: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WorkflowParameterError(
            f"--param-file {path}: expected a mapping of parameter names to values "
            f"(YAML or JSON), got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}
