# The two commands of the README:
#   make run    set up .venv, then start a local top-level/secondary/enterprise hierarchy
#   make test   set up .venv, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit clean install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard proto/idis/v1/*.proto) $(wildcard resolver/*.pyx)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/idis-local --state-dir state

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info proto/idis/v1/*_pb2*.py proto/idis/v1/*_pb2*.pyi
