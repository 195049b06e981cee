"""Minimal SARIF 2.1.0 builders (the subset code-scanning consumers read).

A log is ``{"version": "2.1.0", "$schema": ..., "runs": [...]}``; each run names its tool
(``tool.driver.name`` and ``rules``) and lists ``results`` with ``ruleId``, ``level``,
``message.text`` and one physical location relative to the workspace root (uriBaseId
``WORKSPACE``), so the same log is valid whichever cache path the workspace had.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
URI_BASE = "WORKSPACE"
#: Severity (our vocabulary, shared by the tools) -> SARIF result level.
LEVELS = {"high": "error", "medium": "warning", "low": "note"}


def rule(
    rule_id: str,
    name: str,
    description: str,
    *,
    help_uri: str | None = None,
    severity: str = "medium",
) -> dict[str, Any]:
    """A ``reportingDescriptor`` for ``tool.driver.rules``."""
    out: dict[str, Any] = {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": description},
        "defaultConfiguration": {"level": LEVELS.get(severity, "warning")},
    }
    if help_uri:
        out["helpUri"] = help_uri
    return out


def result(
    rule_id: str,
    rule_index: int,
    severity: str,
    message: str,
    uri: str,
    *,
    line: int | None = None,
    column: int | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A SARIF ``result`` at ``uri`` (relative to the workspace root), optionally a line."""
    physical: dict[str, Any] = {"artifactLocation": {"uri": uri, "uriBaseId": URI_BASE}}
    if line is not None and line > 0:
        region: dict[str, Any] = {"startLine": line}
        if column is not None and column > 0:
            region["startColumn"] = column
        physical["region"] = region
    out: dict[str, Any] = {
        "ruleId": rule_id,
        "ruleIndex": rule_index,
        "level": LEVELS.get(severity, "warning"),
        "message": {"text": message},
        "locations": [{"physicalLocation": physical}],
    }
    if properties:
        out["properties"] = properties
    return out


def run(
    tool_name: str,
    *,
    version: str | None,
    information_uri: str | None,
    rules: Iterable[dict[str, Any]],
    results: Iterable[dict[str, Any]],
) -> dict[str, Any]:
    """One SARIF ``run`` for one tool."""
    driver: dict[str, Any] = {"name": tool_name, "rules": list(rules)}
    if version:
        driver["version"] = version
    if information_uri:
        driver["informationUri"] = information_uri
    return {
        "tool": {"driver": driver},
        "originalUriBaseIds": {URI_BASE: {"description": {"text": "root of the target workspace"}}},
        "results": list(results),
    }


def log(runs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The top-level SARIF object."""
    return {"version": SARIF_VERSION, "$schema": SARIF_SCHEMA, "runs": list(runs)}


class RuleTable:
    """Collects rules as results refer to them, keeping each rule's index stable."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.rules: list[dict[str, Any]] = []

    def index(self, rule_id: str, make: Any) -> int:
        """Index of ``rule_id``, adding ``make()`` (a rule dict) the first time it is seen."""
        if rule_id not in self._index:
            self._index[rule_id] = len(self.rules)
            self.rules.append(make())
        return self._index[rule_id]
