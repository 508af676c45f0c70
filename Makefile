# kvq: two commands set everything up on a fresh machine.
#   make plan   -- installs kvq, then runs the main job: kvq-sim plan on its built-in configs
#   make test   -- installs kvq and its test tools, lints, then runs the test suite
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install plan test lint test-slow bench-sim report report-png calibrate validate

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

# Issue 6: fit the H100 file from the training half of the committed measurements, carry the fit over to
# the GPUs without measurements, then check every held-out point (exit 1 over a threshold).
KERNEL_CSV ?= reports/measurements/kernel_decode_h100.csv
E2E_CSV ?= reports/measurements/e2e_decode_h100.csv
E2E_ARG = $(if $(wildcard $(E2E_CSV)),--e2e $(E2E_CSV),)
calibrate: install
	kvq-sim calibrate --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG)
	for g in a100-80g a100-40g l40s h200; do kvq-sim calibrate --gpu $$g --transfer-from h100-80g; done

validate: install
	kvq-sim validate --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG)
	$(PYTHON) scripts/validation_residuals.py --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG) \
		-o reports/validation_residuals.png
