# Two commands, each doing its own set-up in a local virtual environment (.venv):
#   make test   runs the test suite
#   make demo   runs the main job on its embedded default (no network, no GPU)
# TORCH_SPEC picks the torch build: the default is the CPU build these machines carry; on a GPU machine use
# e.g. `make test TORCH_SPEC=torch` for PyPI's CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fira_dist-installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fira-dist demo

clean:
	rm -rf $(VENV) runs results
