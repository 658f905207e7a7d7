# `make train` sets up .venv with what training needs and trains with the defaults;
# `make test` adds the test extras (pytest, hypothesis, ONNX, SQL) and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup train test clean

# A torch already in .venv (e.g. the CPU-only wheel, as the README shows) satisfies torch==2.13.0 and is kept.
$(VENV)/.installed-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed-train

setup: $(VENV)/.installed-train

train: $(VENV)/.installed-train
	$(PY) main.py

# Two worker processes: most tests wait on a subprocess's start-up (one core each), so two halve the time on
# 2 cores; `.venv/bin/python -m pytest tests/test_x.py` runs in one process, as usual. The few tests that
# measure a time budget in wall-clock seconds run afterwards on their own: beside another worker on 2 cores a
# validation can take twice as long, and the budget then ends early (seen: 3.9 s of a 9-second budget).
# --dist loadgroup: the tests sharing a file's module fixture (a reference run) stay on one worker (conftest.py).
test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadgroup -m 'not slow and not wallclock'
	$(PY) -m pytest -m 'wallclock and not slow'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
