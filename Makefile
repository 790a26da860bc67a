# The two set-up commands: `make test` and `make train` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra arguments, e.g. `make test PYTEST_ARGS="-k rope -x"`, `make train TRAIN_ARGS="--steps 50"`.
PYTEST_ARGS ?=
TRAIN_ARGS ?=

.PHONY: test train bench venv clean

venv: $(VENV)/.installed

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Test processes (pytest-xdist): the suite's time is XLA compiles and interpreted kernels, each
# on one core, so one worker per core; worksteal rebalances when the long tests end up together.
# TEST_WORKERS=0 runs everything in this process (e.g. for pdb).
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The demo: ~5M parameters, 300 steps on the standard library's source: 5 to 8 minutes on 2 CPU
# cores (about 2,300 tokens/s when the machine is otherwise idle, plus ~10 s of compiling). Each
# run gets a fresh directory; the first also trains the tokenizer and tokenises the corpus (about
# a minute), which later runs reuse. `exec`: Ctrl-C and SIGTERM reach the trainer itself.
# `make train RESUME=runs/demo-...` continues that run instead (its saved settings; TRAIN_ARGS
# may change the safe ones, e.g. TRAIN_ARGS="--steps 600").
RESUME ?=
train: venv
ifeq ($(strip $(RESUME)),)
	exec $(PY) -m palm train --preset demo --out runs/demo-$$(date +%Y%m%d-%H%M%S) \
	  --tokenizer runs/demo-tokenizer.model --cache-dir runs/cache --warmup-steps 20 $(TRAIN_ARGS)
else
	exec $(PY) -m palm train --out $(RESUME) --resume $(TRAIN_ARGS)
endif

bench: venv
	$(PY) -m pytest bench/ --benchmark-only

clean:
	rm -rf $(VENV)
