# Two commands on a fresh clone: `make run` (the runtime) and `make test` (plus the test tools).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Two stamps: `make run` installs the runtime (every extra but the test tools); `make test` adds
# the test tools. Each reinstalls only when pyproject.toml changes; editable installs keep src/ live.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup run test test-nonroot coverage mutation lint bench clean fuzz

setup: $(TEST_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# pip's own progress stays visible: the first install downloads ~150 MB (Temporal's server,
# atheris...). A venv that already has the test extras has the runtime too.
$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	@if [ -f $(TEST_STAMP) ] && [ $(TEST_STAMP) -nt pyproject.toml ]; then :; else \
	  echo "make: installing forgespace[all] (Temporal, the workflows' tools) into $(VENV); the first time takes about a minute"; \
	  $(PY) -m pip install --progress-bar on -e '.[all]'; fi
	touch $@

$(TEST_STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "make: installing forgespace[all,test] (the runtime and the test tools) into $(VENV); the first time takes about a minute"
	$(PY) -m pip install --progress-bar on -e '.[all,test]'
	touch $@

# The main job on embedded defaults: a real Temporal dev server and an in-process worker, four
# concurrent runs of a shared-mode scanner against one download of the bundled example.
RUN_ARGS ?= security_assessment examples/vulnerable_app --runs 4

run: $(RUN_STAMP)
	@case "$(RUN_ARGS)" in *cargo_fuzzing*) ls /usr/lib/llvm-*/lib/libFuzzer.a >/dev/null 2>&1 || \
	  echo "make run: cargo_fuzzing needs libFuzzer: sudo apt-get install libfuzzer-14-dev librust-arbitrary-dev (as .ci/run does)" >&2;; esac
	$(VENV)/bin/forgespace run $(RUN_ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

# The non-root lane: the tests whose behaviour differs for an unprivileged worker (unit, engine,
# store, CLI, the cache's permission fallbacks) once more as uid 65534 (.ci/test-nonroot). That
# user needs an interpreter it can execute and read: a venv of its own from the system Python
# (the main venv's python may be a link into root's home), owned by root, readable by all;
# ~1 min to build (pip's cache), rebuilt only when pyproject.toml changes. Mount tests skip there.
NONROOT_PYTHON ?= /usr/bin/python3
NONROOT_VENV   := .venv-nonroot
NONROOT_STAMP  := $(NONROOT_VENV)/.installed
NONROOT_TESTS  ?= tests/unit $(wildcard tests/integration/test_engine_*.py) \
	tests/integration/test_store.py tests/integration/test_store_faults.py \
	tests/integration/test_cli_errors.py tests/integration/test_cli_upload.py \
	tests/integration/test_cache_cli.py tests/integration/test_trust_fs.py \
	tests/integration/test_gc_concurrency.py

$(NONROOT_STAMP): pyproject.toml
	rm -rf $(NONROOT_VENV)
	$(NONROOT_PYTHON) -m venv $(NONROOT_VENV)
	$(NONROOT_VENV)/bin/python -m pip install -q -e '.[all,test]'
	chmod -R a+rX $(NONROOT_VENV)
	touch $@

test-nonroot: $(NONROOT_STAMP)
	.ci/test-nonroot $(NONROOT_VENV)/bin/python $(NONROOT_TESTS)

# Branch coverage of the whole suite, subprocesses included (workers, CLI runs, crash-test
# children: configuration in pyproject.toml [tool.coverage.run]); data in .coverage-data/,
# combined, then reported (COVERAGE_ARGS: pytest arguments, e.g. a subset). Tools the tests
# start in the bubblewrap sandbox are measured too (tests/support/covsandbox.py). Then the
# non-root lane's tests (COVERAGE_NONROOT, default NONROOT_TESTS; empty: skip) run as uid 65534
# under coverage too (COVERAGE_PROCESS_START: the lane's venv has coverage's .pth), since CI runs
# both lanes and only the second reaches the permission fallbacks. ~25 min on a shared machine.
COVERAGE_ARGS ?=
COVERAGE_NONROOT ?= $(NONROOT_TESTS)
COV_DATA := $(CURDIR)/.coverage-data

# The data directory is world-writable (sticky): children the tests run as uid 65534 save
# their data too. COVERAGE_DESELECT: test ids to leave out (none needed now).
COVERAGE_DESELECT ?=

coverage: $(TEST_STAMP) $(if $(COVERAGE_NONROOT),$(NONROOT_STAMP))
	rm -rf $(COV_DATA) && mkdir -p $(COV_DATA) && chmod 1777 $(COV_DATA)
	COVERAGE_FILE=$(COV_DATA)/cov $(VENV)/bin/coverage run -m pytest -q \
	  $(addprefix --deselect ,$(COVERAGE_DESELECT)) $(COVERAGE_ARGS)
	$(if $(COVERAGE_NONROOT),COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml \
	  COVERAGE_FILE=$(COV_DATA)/cov .ci/test-nonroot $(NONROOT_VENV)/bin/python \
	  $(addprefix --deselect ,$(COVERAGE_DESELECT)) $(COVERAGE_NONROOT))
	COVERAGE_FILE=$(COV_DATA)/cov $(VENV)/bin/coverage combine -q $(COV_DATA)
	COVERAGE_FILE=$(COV_DATA)/cov $(VENV)/bin/coverage report --sort=cover
	COVERAGE_FILE=$(COV_DATA)/cov $(VENV)/bin/coverage json -q -o $(COV_DATA)/coverage.json
	@$(PY) tests/support/covreport.py $(COV_DATA)/coverage.json

# Mutation testing (mutmut, configured in pyproject.toml [tool.mutmut]) for at most
# MUTATION_SECONDS; mutmut keeps its results in mutants/ and resumes where it stopped, so
# repeated runs cover everything. `mutmut results` lists the survivors, `mutmut show NAME`
# one of them. MUTANTS selects (e.g. "forgespace.cache.cleanup*"). MUTATION_DESELECT: test-id
# prefixes left out of every mutant's run (tests/support/mutation_scope.py), e.g.
# "tests/integration/" for the archive reader, which the gc tests reach only incidentally.
MUTATION_SECONDS ?= 1800
MUTANTS ?=
MUTATION_DESELECT ?=

mutation: $(TEST_STAMP)
	-FORGESPACE_MUTATION_DESELECT="$(MUTATION_DESELECT)" timeout --signal=INT $(MUTATION_SECONDS) \
	  $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats >/dev/null 2>&1 || true
	@$(PY) -c "import json; s=json.load(open('mutants/mutmut-cicd-stats.json')); \
	  d=s['killed']+s['survived']; print(f\"killed {s['killed']} of {d} tested ({100*s['killed']/max(d,1):.1f} %), \
	  survived {s['survived']}, of {s['total']} mutants in all\")"

# Fuzz for FUZZ_SECONDS in all, shared by FUZZ_TARGETS: the archive reader (tar/zip parsing,
# member checks, extraction) and the inputs of incremental targets (manifests, blob packs), each
# from its committed seeds (fuzz/corpus/TARGET); new inputs and crash inputs go to fuzz/out/
# (ignored by git). Any finding ends it non-zero and prints the input. See docs/testing.md.
FUZZ_SECONDS ?= 90
FUZZ_TARGETS ?= archive manifest
FUZZ_ARGS ?=

fuzz: setup
	FUZZ_TARGETS="$(FUZZ_TARGETS)" fuzz/run.sh $(PY) $(FUZZ_SECONDS) $(FUZZ_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(NONROOT_VENV) build *.egg-info src/*.egg-info
