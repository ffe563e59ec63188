# Set-up is part of every target: a fresh machine needs only `make compare` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.isynth-installed
# torch for this machine: the CPU build where no NVIDIA GPU is visible (the plain wheel is a multi-GB
# CUDA build). Elsewhere, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup compare test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q "torch>=2.3"
else
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
endif
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

compare: $(STAMP)  ## the main job: every paradigm on digits at equal training FLOPs
	$(VENV)/bin/isynth compare --out runs/compare

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/train_mfu.py

clean:
	rm -rf $(VENV) runs
