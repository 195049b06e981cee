# Two commands on a fresh clone: `make run` and `make test`. Both build .venv through `make setup`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean fuzz

setup: $(STAMP)

# Reinstall only when the project metadata changes; editable install keeps src/ live.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on embedded defaults: a real Temporal dev server and an in-process worker, four
# concurrent runs of a shared-mode scanner against one download of the bundled example.
RUN_ARGS ?= security_assessment examples/vulnerable_app --runs 4

run: setup
	$(VENV)/bin/forgespace run $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q

# Fuzz the archive reader (tar/zip parsing, member checks, extraction) for FUZZ_SECONDS from the
# committed seeds (fuzz/corpus/archive); new inputs and crash inputs go to fuzz/out/ (ignored by
# git). Any finding ends it non-zero and prints the input. See docs/testing.md.
FUZZ_SECONDS ?= 90
FUZZ_ARGS ?=

fuzz: setup
	fuzz/run.sh $(PY) $(FUZZ_SECONDS) $(FUZZ_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
