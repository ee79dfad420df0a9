# make demo: create .venv, install dist-attn, run the main job.
# make test: create .venv, install dist-attn with the test extra, run the test suite.
#
# torch: a torch already importable in .venv (or, with the default --system-site-packages, in the
# Python that creates it) is reused. Otherwise $(TORCH) is installed; choose your own build with e.g.
#   make test TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?= --system-site-packages
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test install clean

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
	$(PY) -m pytest -q
