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

# Fuzz the archive reader (tar/zip parsing and member checks) for FUZZ_SECONDS with the committed
# seeds. New interesting inputs go to fuzz/out/corpus and crash inputs to fuzz/out/crashes (both
# ignored by git); a crash, a timeout or a leak ends it with a non-zero status and prints the input.
# The outer `timeout` is a backstop in case libFuzzer itself stops honouring -max_total_time.
FUZZ_SECONDS ?= 90
FUZZ_ARGS ?=
FUZZ_OUT := fuzz/out

fuzz: setup
	@mkdir -p $(FUZZ_OUT)/corpus $(FUZZ_OUT)/crashes
	@scratch=$$(mktemp -d "$${FUZZ_SCRATCH_PARENT:-$$(test -w /dev/shm && echo /dev/shm || echo /tmp)}/forgespace-fuzz.XXXXXX"); \
	rc=0; FORGESPACE_FUZZ_DIR=$$scratch timeout --kill-after=10 $$(( $(FUZZ_SECONDS) + 60 )) \
	  $(PY) fuzz/fuzz_archive.py $(FUZZ_OUT)/corpus fuzz/corpus/archive \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_OUT)/crashes/ $(FUZZ_ARGS) || rc=$$?; \
	rm -rf "$$scratch"; \
	if [ $$rc -ne 0 ]; then \
	  echo "fuzz: FAILED (exit $$rc); crash inputs (base64):" >&2; \
	  for f in $(FUZZ_OUT)/crashes/*; do [ -f "$$f" ] || continue; \
	    echo "== $$f ($$(stat -c %s "$$f") bytes)" >&2; head -c 65536 "$$f" | base64 >&2; done; \
	  exit 1; \
	fi

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
