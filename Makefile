# Two commands for a newcomer on a fresh machine (README.md):
#   make demo   train a small MEGABYTE on the built-in corpus, report bits per byte, sample text
#   make test   run the whole test suite (reference, Triton interpreter parity, AOT compile)
# Both create .venv and install what they need. torch==2.13.0 is the CPU wheel; when the
# interpreter that creates the venv can already import torch (say, a CUDA build), the venv
# sees it through --system-site-packages and nothing is downloaded for it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast aot aot-table perf-model bench gpu-check clean

$(STAMP): pyproject.toml setup.py
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch that $(PYTHON) already has"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	@# build the native CPU ops (csrc/) once now, so no later command pays the compile; without a
	@# compiler this only warns and backend="auto" uses the reference ops on CPU
	@$(PY) -c "from megabyte_kernels import native; print('native CPU ops:', 'built' if native.available() else 'not built, the reference ops serve CPU')"
	@touch $@

demo: $(STAMP)
	$(PY) -m megabyte train

test: $(STAMP)
	$(PY) -m pytest tests -q

# everything but the ahead-of-time compile tests
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not aot"

aot: $(STAMP)
	$(PY) -m pytest tests -q -m aot -s

# every kernel x every autotune config compiled for sm_90 (172 compiles, 3-5 min on 2 cores): rewrites
# benchmarks/results/aot-sm90.json/.md, which `make test` compares the pinned configs against
aot-table: $(STAMP)
	$(PY) -m benchmarks.aot_table

# the performance model of gpu-check's target rows (seconds, CPU): reads the AOT table, rewrites
# benchmarks/results/perf-model.json/.md/.png, which tests/test_perf_model.py compares against
perf-model: $(STAMP)
	$(PY) -m benchmarks.perf_model

# the benchmark suite (benchmarks/README.md): on a GPU the full sizes, on CPU --quick
bench: $(STAMP)
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m benchmarks.run; \
	else \
		$(PY) -m benchmarks.run --quick; \
	fi

# the GPU tier on a machine with a GPU in one call of at most 300 s (benchmarks/gpu_check.py):
# preflight, smoke parity of every kernel, the GPU-tier tests, benchmarks; every file in GPU_CHECK_OUT
# (default benchmarks/results/gpu-check-<date>). Uses the python3 that is already there (no venv,
# no pip, no network); the checkout goes on PYTHONPATH. Without make:
#   PYTHONPATH=$PWD python3 -m benchmarks.gpu_check --out DIR
GPU_CHECK_OUT ?=
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m benchmarks.gpu_check --budget 300 $(if $(GPU_CHECK_OUT),--out "$(GPU_CHECK_OUT)")

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
