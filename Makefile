# The two set-up commands: `make test` and `make train` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k rope -x"`.
PYTEST_ARGS ?=

.PHONY: test train bench venv clean

venv: $(VENV)/.installed

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: venv
	$(PY) -m palm forward --preset demo

bench: venv
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV)
