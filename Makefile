# Two commands set everything up on a fresh clone: `make demo` and `make test` (`make notebook` opens the notebook).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format browser notebook clean

# Re-installs only when pyproject.toml changes, so repeated runs are fast.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sat weights fetch
	$(BIN)/sat caption examples/ --attention-dir attention-maps

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The edit loop: everything but the tests marked slow (torchrun, browser, shipped model, full ResNet builds).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# JupyterLab in .venv (once), opening the notebook; its "Python 3" kernel is .venv's Python.
$(VENV)/.notebook: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,notebook]'
	touch $@

notebook: $(VENV)/.notebook
	$(BIN)/jupyter lab notebooks/show_attend_tell.ipynb

# Debian's chromium for the real-browser test (Playwright's own browser download does not work offline).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
