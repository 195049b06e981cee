# Two commands on a fresh clone: `make run` and `make test`. Both build .venv through `make setup`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean

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
	@case "$(RUN_ARGS)" in *cargo_fuzzing*) ls /usr/lib/llvm-*/lib/libFuzzer.a >/dev/null 2>&1 || \
	  echo "make run: cargo_fuzzing needs libFuzzer: sudo apt-get install libfuzzer-14-dev librust-arbitrary-dev (as .ci/run does)" >&2;; esac
	$(VENV)/bin/forgespace run $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
