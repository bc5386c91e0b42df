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

.PHONY: demo test test-fast aot bench gpu-check clean

$(STAMP): pyproject.toml setup.py
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch that $(PYTHON) already has"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
