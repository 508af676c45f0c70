# kvq: two commands set everything up on a fresh machine.
#   make plan   -- installs kvq, then runs the main job: kvq-sim plan on its built-in configs
#   make test   -- installs kvq and its test tools, lints, then runs the test suite
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install plan test lint test-slow bench-sim

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

plan: install
	kvq-sim plan --model llama-7b --gpu a100-80g --bits 2

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m slow -q $(PYTEST_ARGS)
