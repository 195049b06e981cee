"""Narrow the tests a ``make mutation`` run gives each mutant (``MUTATION_DESELECT``).

mutmut maps every mutated function to the tests that reached it and runs those for each of
its mutants, fastest first, stopping at the first failure: a mutant that survives costs every
test that reached its function. The archive reader is reached by the gc and race integration
tests too (they extract real targets), which would make each archive survivor cost ~30 s of
tests written for eviction. ``make mutation MUTATION_DESELECT="tests/integration/"`` sets
``FORGESPACE_MUTATION_DESELECT``: space-separated node-id prefixes this plugin leaves out of
every mutant's run. mutmut's own mapping run (``MUTANT_UNDER_TEST=stats``) keeps the whole
selection, so later runs without the variable still know every test of every function. A
narrower selection can only under-count kills; docs/testing.md names what each figure used.
Without the variable (every plain pytest run) the plugin does nothing.
"""

from __future__ import annotations

import os

import pytest

_ENV = "FORGESPACE_MUTATION_DESELECT"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    prefixes = tuple(os.environ.get(_ENV, "").split())
    if not prefixes or os.environ.get("MUTANT_UNDER_TEST") == "stats":
        return
    left_out = [item for item in items if item.nodeid.startswith(prefixes)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.nodeid.startswith(prefixes)]
