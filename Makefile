# make demo: create .venv, install dist-attn, run the main job.
# make test: create .venv, install dist-attn with the test extra, run the test suite.
# make gpu-check: every pending GPU figure in one run (benchmarks/gpu_check.py, about 8 minutes on one GPU),
#   results in benchmarks/results/. It installs nothing (the GPU box has no internet): it runs with .venv's
#   python when that one imports torch, else with $(PYTHON); choose with GPU_CHECK_PYTHON=..., pass options
#   with GPU_CHECK_ARGS=..., e.g. make gpu-check GPU_CHECK_ARGS="--dry-run" (CPU, tiny shapes, temp dir).
#
# torch: a torch already importable in .venv (or, with the default --system-site-packages, in the
# Python that creates it) is reused. Otherwise $(TORCH) is installed; choose your own build with e.g.
#   make test TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?= --system-site-packages
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
GPU_CHECK_PYTHON ?=
GPU_CHECK_ARGS ?=

.PHONY: demo test install clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m launch.demo

test: install
	$(PY) -m pytest -q --durations=25

gpu-check:
	@py="$(GPU_CHECK_PYTHON)"; \
	if [ -z "$$py" ]; then \
		if [ -x "$(PY)" ] && "$(PY)" -c "import torch" 2>/dev/null; then py="$(PY)"; else py="$(PYTHON)"; fi; \
	fi; \
	echo "make gpu-check: $$py -m benchmarks.gpu_check $(GPU_CHECK_ARGS)"; \
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" "$$py" -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
