# Two commands for a fresh machine: `make demo` and `make test` (each installs what is missing and builds).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA 13 build of torch: nvcc compiles every .cu file with it, also on a machine without a GPU.
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy pytest pytest-timeout ninja scikit-learn tqdm matplotlib hypothesis psutil torchft
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml
DEPS_STAMP := $(VENV)/.pyparallel-deps
BUILD_STAMP := $(VENV)/.pyparallel-build

.PHONY: demo test build install bench clean gpu-check

# Two ranks on this machine (torchrun, Gloo) train the digits classifier with the int8 hook.
demo: build
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m pyparallel.train --hook int8 --epochs 15

test: build
	$(PY) -m pytest tests

install: $(DEPS_STAMP)

$(DEPS_STAMP): Makefile
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	@touch $@

# --no-build-isolation: build against the torch installed above, never an isolated one pulled from an index.
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@mkdir -p build
	@echo "building pyparallel._C (log: build/build.log)"
	@$(PY) -m pip install --no-build-isolation --no-deps -v -e . > build/build.log 2>&1 || \
		{ tail -n 60 build/build.log; echo "build failed: see build/build.log"; exit 1; }
	@grep -F '[pyparallel setup]' build/build.log | sort -u
	@echo "compiled:"
	@sed -nE 's/^ *\[([0-9]+\/[0-9]+)\] ([^ ]+) .* -c ([^ ]+) .*/  [\1] \3  (\2)/p' build/build.log
	@touch $@

bench: build
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/allreduce.py -n 2

# On a machine with a CUDA GPU and torch already installed (issue 12): build against that torch, run every
# CUDA test, compute-sanitizer and the GPU benchmarks, in under 10 minutes; installs nothing. Writes
# gpu-check.{json,txt,log} to $$OUT when set, else to benchmarks/results/ (benchmarks/gpu_check.py).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build pyparallel/_C*.so *.egg-info $(BUILD_STAMP)
