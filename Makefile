# The two commands of the README: `make run` (the local stack) and `make test` (the whole suite).
# Both install what they need: a Python venv with the pinned requirements, and Azurite from npm.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: test test-fast lint typecheck run bench mutants deps tools clean

test: deps tools lint typecheck
	$(PY) -m pytest

# The unit tier alone: pure code and the virtual-world simulation, no Azurite, no processes.
test-fast: deps lint typecheck
	$(PY) -m pytest tests/unit

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: deps
	$(BIN)/mypy

deps: $(VENV)/.stamp-deps
$(VENV)/.stamp-deps: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

tools: tools/node_modules/.stamp-azurite
tools/node_modules/.stamp-azurite: tools/package.json
	cd tools && npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

# The local stack on the standard ports (app 7071, simulator 7080, identity 7081, Azurite
# 10000-10002). Pass options through RUN_ARGS, e.g. make run RUN_ARGS="--port 7072 --seed 10".
run: deps tools
	$(PY) -m localdev.stack $(RUN_ARGS)

bench: deps tools
	$(PY) -m bench.overhead
	$(PY) -m bench.limiter
	$(PY) -m bench.queue
	$(PY) -m bench.tenants
	$(PY) -m bench.bulk
	$(PY) -m bench.logs

# A mutation run over the promises (bench/mutants.py): not part of make test; a few minutes.
mutants: deps tools
	$(PY) -m bench.mutants

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache .ruff_cache bench/results
