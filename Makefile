# Two commands, each doing its own set-up in a local virtual environment (.venv):
#   make test   runs the test suite
#   make demo   runs the main job on its embedded default (no network, no GPU)
# and one for a machine with an NVIDIA GPU, in its own environment (.venv-gpu):
#   make gpu    the CUDA tests, GPU step times and a one-GPU pretraining run, in under 8 minutes
#               (benchmarks/gpu_check.py; without a GPU it says so and the script exits 3)
# TORCH_SPEC picks the torch build: the default is the CPU build these machines carry; on a GPU machine use
# e.g. `make test TORCH_SPEC=torch` for PyPI's CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# make gpu: GPU_TORCH_SPEC is what pip installs as torch there (PyPI's Linux wheels are CUDA builds),
# GPU_PIP_ARGS more pip flags (e.g. --no-index --find-links .whl), GPU_ARGS more flags of gpu_check.py (--offline)
GPU_VENV ?= .venv-gpu
GPU_TORCH_SPEC ?= torch==2.13.0
GPU_PIP_ARGS ?=
GPU_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fira_dist-installed

.PHONY: test demo install gpu clean

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

gpu:
	$(PYTHON) benchmarks/gpu_check.py --venv '$(GPU_VENV)' --torch-spec='$(GPU_TORCH_SPEC)' \
	  --pip-args='$(GPU_PIP_ARGS)' $(GPU_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) runs results
