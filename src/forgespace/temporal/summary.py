"""What a finished run found, read from its result: for `forgespace run`'s summary and --fail-on.

Pure functions over the JSON a workflow returned (forgespace's bundled workflows, or any other
shape: FuzzForge-style return values). They understand the habits those results share:

- a SARIF log under ``sarif`` (its levels are the severities: error = high, warning = medium,
  note/none = low; a result without a level is a warning, as SARIF says);
- a ``findings`` list of dicts with ``severity``, ``file``/``line`` (or ``location``) and a rule
  (``rule_id``, ``type``, ``kind``);
- fuzzing crashes (``signature``, ``crash_file``, ``exception_type``/``kind``, ``location``);
- test suites (``tests``, ``passed``, ``failed``, ``failures``, ``coverage_percent``);
- where the results were stored (``results_location``: ``{"json": ..., "sarif": ...}``).

Anything else is summarised by its finding count alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Severity names from lowest to highest (the values ``--fail-on`` accepts).
SEVERITIES = ("low", "medium", "high")
_RANK = {name: i for i, name in enumerate(SEVERITIES)}
# What tools and SARIF call their levels, mapped onto the three.
_ALIASES = {
    "error": "high",
    "critical": "high",
    "high": "high",
    "warning": "medium",
    "medium": "medium",
    "moderate": "medium",
    "note": "low",
    "low": "low",
    "info": "low",
    "none": "low",
}


def severity_name(value: Any) -> str | None:
    """``value`` as one of SEVERITIES (SARIF levels and common tool names), or None."""
    if not isinstance(value, str):
        return None
    return _ALIASES.get(value.strip().lower())


@dataclass(frozen=True)
class Finding:
    """One finding as the summary shows it."""

    severity: str | None  # one of SEVERITIES; None: the tool gave none
    where: str  # "file:line", or "" when unknown
    rule: str  # rule id / secret type / crash kind
    message: str

    def line(self) -> str:
        parts = [f"{self.severity or '-':<6}", self.where or "-", self.rule]
        text = "  ".join(p for p in parts if p)
        return f"{text}  {self.message}" if self.message else text


def _sarif_findings(sarif: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    for run in sarif.get("runs") or []:
        if not isinstance(run, dict):
            continue
        for r in run.get("results") or []:
            if not isinstance(r, dict):
                continue
            where = ""
            for loc in r.get("locations") or []:
                phys = loc.get("physicalLocation") if isinstance(loc, dict) else None
                if isinstance(phys, dict):
                    uri = (phys.get("artifactLocation") or {}).get("uri", "")
                    line = (phys.get("region") or {}).get("startLine")
                    where = f"{uri}:{line}" if uri and line else str(uri)
                    break
            message = r.get("message")
            text = message.get("text", "") if isinstance(message, dict) else str(message or "")
            out.append(
                Finding(
                    severity=severity_name(r.get("level", "warning")) or "medium",
                    where=where,
                    rule=str(r.get("ruleId") or ""),
                    message=_one_line(text),
                )
            )
    return out


def _where(f: dict[str, Any]) -> str:
    file = f.get("file") or f.get("path")
    if file:
        line = f.get("line") or f.get("line_number")
        return f"{file}:{line}" if line else str(file)
    return str(f.get("location") or "")


def _listed_findings(findings: Iterable[Any]) -> list[Finding]:
    out = []
    for f in findings:
        if not isinstance(f, dict):
            continue
        rule = f.get("rule_id") or f.get("type") or f.get("exception_type") or f.get("kind")
        message = f.get("message") or f.get("exception_message") or f.get("title") or ""
        out.append(
            Finding(
                severity=severity_name(f.get("severity")),
                where=_where(f),
                rule=str(rule or ""),
                message=_one_line(str(message)),
            )
        )
    return out


def _one_line(text: str, width: int = 100) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 1] + "…"


def findings_of(result: Any) -> list[Finding]:
    """Every finding ``result`` lists: its SARIF results when it carries SARIF (the richer
    form), else its ``findings`` list; [] when it lists none."""
    if not isinstance(result, dict):
        return []
    sarif = result.get("sarif")
    if isinstance(sarif, dict) and isinstance(sarif.get("runs"), list):
        return _sarif_findings(sarif)
    listed = result.get("findings")
    if isinstance(listed, list):
        return _listed_findings(listed)
    return []


def severities(result: Any, count: int) -> list[str]:
    """The severity of each of a run's ``count`` findings, for ``--fail-on``.

    A finding without a severity (a fuzzing crash, a failing test, a count without a list) is
    ranked high: a CI gate must not pass what it cannot rank.
    """
    listed = findings_of(result)
    ranked = [f.severity or "high" for f in listed]
    return ranked + ["high"] * max(0, count - len(ranked))


def at_or_above(found: Iterable[str], threshold: str) -> int:
    """How many of ``found`` (severity names) rank at or above ``threshold``."""
    floor = _RANK[threshold]
    return sum(1 for s in found if _RANK.get(s, _RANK["high"]) >= floor)


def top_findings(result: Any, n: int = 5) -> list[Finding]:
    """The ``n`` most severe findings (in the tool's order within a severity)."""
    listed = findings_of(result)
    order = sorted(
        range(len(listed)),
        # Unranked findings count as high, after those the tool itself ranked high.
        key=lambda i: (-_RANK.get(listed[i].severity or "high", 2), listed[i].severity is None, i),
    )
    return [listed[i] for i in order[:n]]


def severity_counts(result: Any) -> str:
    """ "4 high, 4 medium, 5 low" (empty when nothing has a severity)."""
    counts = Counter(f.severity for f in findings_of(result) if f.severity)
    return ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if counts[s])


def detail_lines(result: Any) -> list[str]:
    """Lines only some results have: fuzzing crashes (signature, where, input), test suites
    (counts, coverage, failing tests), fuzzing statistics."""
    if not isinstance(result, dict):
        return []
    lines: list[str] = []
    listed = result.get("findings")
    for f in listed if isinstance(listed, list) else []:
        if isinstance(f, dict) and f.get("signature") and f.get("crash_file"):
            what = f.get("exception_type") or f.get("kind") or "crash"
            msg = _one_line(str(f.get("exception_message") or f.get("message") or ""), 60)
            at = f" at {f['location']}" if f.get("location") else ""
            lines.append(
                f"crash {f['signature']}: {what}{': ' + msg if msg else ''}{at}; "
                f"input {f['crash_file']} ({f.get('input_size', '?')} bytes, base64 in the "
                "results)"
            )
    if isinstance(result.get("tests"), int):
        cov = result.get("coverage_percent")
        lines.append(
            f"tests: {result.get('passed', 0)} passed, {result.get('failed', 0)} failed, "
            f"{result.get('skipped', 0)} skipped"
            + (f"; coverage {cov:.1f}%" if isinstance(cov, int | float) else "")
        )
        for f in (result.get("failures") or [])[:5]:
            if isinstance(f, dict) and f.get("test"):
                msg = _one_line(str(f.get("message") or ""), 70)
                lines.append(f"  failed {f['test']}" + (f": {msg}" if msg else ""))
    if isinstance(result.get("executions"), int):
        stopped = result.get("stopped")
        lines.append(
            f"fuzzing: {result['executions']} executions"
            + (f", {result['exec_per_sec']:.0f}/s" if result.get("exec_per_sec") else "")
            + (f", stopped by {stopped}" if stopped else "")
        )
    return lines


def results_location(result: Any) -> dict[str, str]:
    """Where the workflow stored its results (``{"json": ..., "sarif": ...}``), if it says."""
    if not isinstance(result, dict):
        return {}
    loc = result.get("results_location")
    if isinstance(loc, dict):
        return {str(k): str(v) for k, v in loc.items() if v}
    if isinstance(loc, str) and loc:
        return {"json": loc}
    return {}
