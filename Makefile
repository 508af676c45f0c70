# kvq: two commands set everything up on a fresh machine.
#   make plan   -- installs kvq, then runs the main job: kvq-sim plan on its built-in configs
#   make test   -- installs kvq and its test tools, lints, then runs the test suite
PYTHON ?= python3
PYTEST_ARGS ?=
# The suite runs in PYTEST_WORKERS processes (pytest-xdist, whole files per worker so a module's fixtures are built
# once), each with single-threaded torch. On a 2-core machine like CI's one process took 874 s (135 s of it the 136
# batched-eval tests); 2 workers took 456-485 s with 78 of those moved to test-slow, and 2 workers with torch's own
# 2 threads each oversubscribed the cores, about 3x slower than one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install plan test lint test-slow live-check bench-sim report report-png calibrate validate validate-h200 quality docs

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

plan: install
	kvq-sim plan --model llama-7b --gpu a100-80g --bits 2

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PYTHON) -m pytest $(PYTEST_PARALLEL) -m "not slow and not live" -q $(PYTEST_ARGS)

test-slow: install
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PYTHON) -m pytest $(PYTEST_PARALLEL) -m slow -q $(PYTEST_ARGS)

# Wall-clock checks of the simulator's scaling on this CPU: meaningful on a quiet machine only.
live-check: install
	$(PYTHON) -m pytest -m live -q $(PYTEST_ARGS)

# Speed of kvq-sim itself: cold `kvq-sim plan` and a 100,000-point API sweep (targets < 0.5 s and < 1 s).
# The GPU benchmarks are run by hand on a GPU machine: kernels in packages/kvq-kernels/benchmarks/, whole-model
# decode steps in benchmarks/ (each file's docstring gives its command).
bench-sim: install
	$(PYTHON) packages/kvq-sim/benchmarks/bench_speed.py

# The generated sections of README.md, docs/ and the package READMEs (tests/test_readme.py checks them).
docs: install
	$(PYTHON) scripts/readme_sections.py

# The committed example report and, beside it, the numbers its pages show (reports/llama-7b.json, which also
# fills the generated section of docs/reports.md); kvq-sim's test_report_current.py fails when they are stale.
REPORT_ARGS = --model llama-7b --gpu a100-80g --gpu l40s --gpu h100-80g --gpu h200
report: install
	kvq-sim report $(REPORT_ARGS) -o reports/llama-7b.pdf
	$(PYTHON) -m kvq_sim.report_data $(REPORT_ARGS) -o reports/llama-7b.json --doc docs/reports.md

# Its pages as PNG for review, drawn by matplotlib from the same figures (no poppler needed).
report-png: install
	$(PYTHON) -m kvq_sim.report $(REPORT_ARGS) --png reports/png

# Fit the H100 and H200 files from the training half of their committed measurements, carry the H100 fit over
# to the GPUs without measurements, then check every held-out point (exit 1 over a threshold).
KERNEL_CSV ?= reports/measurements/kernel_decode_h100_v5.csv
E2E_CSV ?= reports/measurements/e2e_decode_h100_v5.csv
H200_KERNEL_CSV ?= reports/measurements/kernel_decode_h200_v16.csv
# the same kernels at head layouts the main sweep does not have (32/4, 64/8, 28/4): the GQA families' per-query cost
H200_LAYOUTS_CSV ?= reports/measurements/kernel_decode_h200_new_heads.csv
H200_E2E_CSV ?= reports/measurements/e2e_decode_h200_v7.csv
E2E_ARG = $(if $(wildcard $(E2E_CSV)),--e2e $(E2E_CSV),)
calibrate: install
	kvq-sim calibrate --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG)
	kvq-sim calibrate --gpu h200 --measurements $(H200_KERNEL_CSV) --measurements $(H200_LAYOUTS_CSV) --e2e $(H200_E2E_CSV)
	for g in a100-80g a100-40g l40s; do kvq-sim calibrate --gpu $$g --transfer-from h100-80g; done

validate: install
	kvq-sim validate --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG)
	$(PYTHON) scripts/validation_residuals.py --gpu h100-80g --measurements $(KERNEL_CSV) $(E2E_ARG) \
		-o reports/validation_residuals.png

# The H200, fitted on the training half of its own sweep and decode steps (docs/validation.md gives its figures).
validate-h200: install
	kvq-sim validate --gpu h200 --measurements $(H200_KERNEL_CSV) --measurements $(H200_LAYOUTS_CSV) --e2e $(H200_E2E_CSV)

# Every CSV in reports/quality from scratch, one command (SmolLM2-135M on CPU, `kvq-eval --help`), at a clean commit
# (tests/test_quality_reports.py refuses rows from a dirty tree or from other kvq-core sources than HEAD's).
# Decode: 16 windows of prefill 384 + 128 scored spread over the text (the 512-token table), and the 4K-token
# windows (kvq-eval's default: 8 windows of prefill 3968 + 128 scored); teacher-forced: 4 windows of 512, chunks of 16.
# kvq-eval runs each cache's windows as one batch (16 x 512 or 8 x 4K tokens, --batch); fp8, hqq, zipcache, mikv and
# minicache mix batch rows and run one window at a time (cli_eval.BATCH_DEPENDENT). Every calibrated method fits its
# state once per command (a Fisher pass, ~2 min each here), so the lines below calibrate 65 times in all.
QUALITY_SHORT = --protocol decode --prefill 384 --scored 128 --windows 16
QUALITY_DIR = reports/quality
QUALITY_PEERS = full quanto:4 quanto:2 hqq:4 hqq:3 hqq:2 fp8
QUALITY_KVQ = fp16 kivi:2 kivi:4 kvquant:2 kvquant:3 kvquant:4 kvquant-dense:2 kvquant-dense:3 int:4 int:8 \
	skvq:k2v1.5 skvq:4
QUALITY_MORE = million:4 million:2 rotatekv:2 rotatekv:3 rotatekv:4 gear:2 gear:4 bfp:4 bfp:k4v8 bfp:8 staircase:2 \
	staircase:3 staircase:4 vidkv:1.5 vidkv:k1.25v1.5 cskv:4 cskv:8 zipcache:2 mikv:2 mikv:3 mikv:4 h2o:0 \
	fp8-e4m3:8 fp8-e5m2:8 int:2 int:3 kivi:3 kivi:8 kvquant-dense:4 skvq:2 skvq:3 skvq:8 \
	xquant:4 xquant:8 xquant-cl:4 xquant-cl:2 minicache
# The 4K-token windows, where the 128-token fp16 windows weigh 3% of the context instead of 25%.
QUALITY_LONG = full fp16 kivi:2 kivi:3 kivi:4 int:4 kvquant:3 kvquant:2 kvquant:4 kvquant-w128:2 kvquant-w128:3 \
	kvquant-w128:4 kvquant-w96:2 kvquant-w96:3 kvquant-w96:4 quanto:4 quanto:2 hqq:4 hqq:3 hqq:2
# MILLION fits plain k-means in its paper, kvq Fisher-weighted k-means: the same caches fitted unweighted, paired.
QUALITY_UNWEIGHTED = million:4 million:2
quality: install
	rm -f $(QUALITY_DIR)/hf_peers_decode.csv $(QUALITY_DIR)/hf_peers_teacher_forced.csv $(QUALITY_DIR)/kvq_decode.csv \
		$(QUALITY_DIR)/kvq_teacher_forced.csv $(QUALITY_DIR)/kvq_decode_more_methods.csv $(QUALITY_DIR)/generate.csv \
		$(QUALITY_DIR)/decode_4k.csv $(QUALITY_DIR)/ablation_unweighted_calibration.csv
	kvq-eval $(QUALITY_PEERS) $(QUALITY_SHORT) --csv $(QUALITY_DIR)/hf_peers_decode.csv
	kvq-eval $(QUALITY_PEERS) --protocol teacher-forced --csv $(QUALITY_DIR)/hf_peers_teacher_forced.csv
	kvq-eval $(QUALITY_KVQ) $(QUALITY_SHORT) --csv $(QUALITY_DIR)/kvq_decode.csv
	kvq-eval $(QUALITY_KVQ) --protocol teacher-forced --csv $(QUALITY_DIR)/kvq_teacher_forced.csv
	kvq-eval $(QUALITY_MORE) $(QUALITY_SHORT) --csv $(QUALITY_DIR)/kvq_decode_more_methods.csv
	kvq-eval generate $(QUALITY_KVQ) $(QUALITY_MORE) quanto:2 hqq:2 fp8 --csv $(QUALITY_DIR)/generate.csv
	kvq-eval $(QUALITY_LONG) --protocol decode --csv $(QUALITY_DIR)/decode_4k.csv
	kvq-eval $(QUALITY_UNWEIGHTED) $(QUALITY_SHORT) --unweighted-calibration \
		--csv $(QUALITY_DIR)/ablation_unweighted_calibration.csv
