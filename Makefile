# kvq: two commands set everything up on a fresh machine.
#   make plan   -- installs kvq, then runs the main job: kvq-sim plan on its built-in configs
#   make test   -- installs kvq and its test tools, lints, then runs the test suite
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install plan test lint test-slow bench-sim report report-png

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

# The committed example report (deterministic: no date in the PDF, so a rerun gives identical bytes).
report: install
	kvq-sim report --model llama-7b --gpu a100-80g --gpu l40s --gpu h100-80g -o reports/llama-7b.pdf

# Its pages as PNG for review (pdftoppm: Debian poppler-utils).
report-png: report
	mkdir -p reports/png
	pdftoppm -r 100 -png reports/llama-7b.pdf reports/png/llama-7b
