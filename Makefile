# `make train` sets up .venv and trains with the defaults; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup train test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) main.py

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
