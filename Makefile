PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs: the dev tools for test/lint/bench, only stroma itself for the demo.
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# pip quiet: -qq shows errors only (the machine's pip configuration warns on every
# package about index folders it does not have).
PIP := $(BIN)/python -m pip --disable-pip-version-check -qq
TYPED := build/typed-examples
# Quiet when run from another make too (no "Entering directory" lines).
MAKEFLAGS += --no-print-directory

.PHONY: install demo test lint bench clean

$(BIN)/python:
	@$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

# The demo needs stroma and its runtime dependencies only. A venv that already has the
# dev install has them too, so the demo then installs nothing.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	@if [ $(STAMP) -nt pyproject.toml ]; then :; else $(PIP) install -e .; fi
	@touch $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	@$(BIN)/python -m stroma demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The package under the project's mypy settings, then user code under --strict: the
# README's python blocks (extracted to files) and the demo.
lint: $(STAMP)
	$(BIN)/ruff check stroma interpreters tests benchmarks examples
	$(BIN)/mypy stroma interpreters
	$(BIN)/python -m tests.api.readme_examples $(TYPED)
	$(BIN)/mypy --strict --follow-imports=silent $(TYPED)/*.py stroma/demo.py \
		tests/api/typed_user_code.py
	$(BIN)/python scripts/unasync.py --check

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
