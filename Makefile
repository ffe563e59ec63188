# Set-up is part of every target: a fresh machine needs only `make compare` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.isynth-installed
# torch for this machine: the CPU build where no NVIDIA GPU is visible (the plain wheel is a multi-GB
# CUDA build). Elsewhere, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup compare test bench clean browser mutation

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

# Debian's chromium for the report's browser test (as root, where apt-get exists; else the test is skipped,
# or fails under CI=1).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && \
		  apt-get install -y -q chromium >/dev/null; }; }; } || echo "chromium not installed: the browser test will skip"

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)  ## CPU benchmarks of BENCHMARKS.md (the sweeps read the main job's runs)
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/train_mfu.py
	test -f runs/compare/results.json || $(VENV)/bin/isynth compare --out runs/compare
	$(PY) benchmarks/sampling_sweep.py runs/compare/mar --variant "head_sampler=ddpm head_steps=100" \
		--variant "head_sampler=dpm++ head_steps=8" --variant "head_sampler=dpm++ head_steps=14"
	$(PY) benchmarks/sampling_sweep.py runs/compare/mdm --variant "cfg_scale=2" \
		--variant "cfg_scale=2 cfg_t_min=0.1 cfg_t_max=0.3" --variant "cfg_scale=2 cfg_t_min=0.2 cfg_t_max=0.6"
	$(PY) benchmarks/sampling_sweep.py runs/compare/diffusion --weights both $(foreach n,4 8 16 32 64,--variant "sampler=euler num_steps=$(n)") \
		$(foreach n,2 4 8 16 32,--variant "sampler=heun num_steps=$(n)")
	$(PY) benchmarks/sampling_sweep.py runs/compare/get $(foreach n,1 2 3 6 12,--variant "fixed_point_iters=$(n)")
	$(VENV)/bin/isynth pairs runs/compare/diffusion --num-pairs 16384 --out runs/pairs16k --quiet
	$(PY) benchmarks/get_pairing.py --pairs runs/pairs16k --out runs/get-pairing --steps 465

# Mutation testing of the core modules (outside CI: hours on 2 cores; BENCHMARKS.md). One child process on one
# thread; MUTANTS='isynth.masking*' restricts the run, and re-running continues where a run stopped.
MUTATION_CHILDREN ?= 1
MUTANTS ?=
define MUTATION_SUMMARY
import collections, glob, json
kinds = {0: "survived", 1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
         24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}
for path in sorted(glob.glob("mutants/isynth/**/*.py.meta", recursive=True)):
    c = collections.Counter(kinds.get(v, "suspicious") for v in json.load(open(path))["exit_code_by_key"].values())
    checked = sum(c.values()) - c["not checked"]
    share = (c["killed"] + c["timeout"]) / checked if checked else float("nan")
    print(f"{path[8:-5]:30s} killed {share:6.1%}  " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())))
endef
export MUTATION_SUMMARY

mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	@$(PY) -c "$$MUTATION_SUMMARY"

clean:
	rm -rf $(VENV) runs
