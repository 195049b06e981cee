"""Optional extras: which modules each needs, and the one message when one is missing.

The core package (cache, stores, CLI) installs without Temporal or the bundled workflows'
tools; ``forgespace[temporal]`` and ``forgespace[workflows]`` add them (pyproject.toml). A
command that needs an extra checks for it first, so a missing one is one line naming the
``pip install`` that fixes it, never an ImportError traceback from deep inside.
"""

from __future__ import annotations

import importlib.util

from forgespace.errors import MissingExtraError

#: extra -> (what it is called in messages, the top-level modules it provides).
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "temporal": ("Temporal", ("temporalio", "pydantic", "jsonschema")),
    "workflows": ("workflows", ("atheris", "bandit", "detect_secrets", "pytest", "coverage")),
}


def missing_modules(*modules: str) -> tuple[str, ...]:
    """The modules of ``modules`` that cannot be imported here (found without importing)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked module counts as missing
            found = False
        if not found:
            out.append(name)
    return tuple(out)


def require_extra(extra: str, what: str, *, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError unless ``extra``'s modules (or just ``modules`` of it) import.

    ``what`` names who needs it: ``require_extra("temporal", "forgespace run")`` fails with
    "forgespace run needs the Temporal extra: pip install 'forgespace[temporal]'".
    """
    label, provided = EXTRAS[extra]
    missing = missing_modules(*(modules if modules is not None else provided))
    if missing:
        raise MissingExtraError(
            f"{what} needs the {label} extra: pip install 'forgespace[{extra}]' "
            f"(missing: {', '.join(missing)})",
            extra=extra,
            modules=missing,
        )
