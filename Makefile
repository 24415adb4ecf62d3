# Every target sets itself up: a venv in .venv with torch (the CPU build when none is installed),
# triton, the test and bench tools, and fastattn built in place.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deps-stamp
BUILD_LOCK := /tmp/fastattn-build.lock

.PHONY: demo test test-fast build bench gpu-check info clean

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q "triton>=3.6" pytest pytest-benchmark pybind11 ninja setuptools wheel numpy matplotlib tqdm "transformers>=4.56" hypothesis
	@touch $(STAMP)

# Editable build of fastattn._C (pip builds in a fresh directory each time, so a rebuild recompiles
# every file unless ccache is on the PATH); serialised by a lock so concurrent builders never race.
build: $(STAMP)
	flock $(BUILD_LOCK) $(VPY) -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	@$(VPY) -c "import fastattn._C" || (echo "fastattn._C failed to build" >&2; exit 1)

demo: build
	$(VPY) -m fastattn.demo

info: build
	$(VPY) -m fastattn.info

# The whole suite on the CPU: Triton kernels under the interpreter on small shapes, the AOT
# compile checks for sm_80/sm_90 with this triton and with triton 3.6.0 (the GPU machines'
# version, installed beside it in .triton36 without a second torch), the CPU kernels, the modules.
TRITON36 := .triton36
test: build $(TRITON36)/.stamp
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -ra tests

$(TRITON36)/.stamp:
	$(VPY) -m pip install -q --target $(TRITON36) --no-deps triton==3.6.0
	@touch $@

# CPU benchmarks; the report is written even when a case fails its correctness check.
bench: build
	$(VPY) -m pytest -q bench --benchmark-json=bench/results/cpu-latest.json; status=$$?; \
	$(VPY) bench/report.py bench/results/cpu-latest.json --out bench/results/cpu-latest.md \
	  --plots bench/results/cpu-latest-plots; exit $$status

# On a machine with a CUDA GPU, one command of at most 9 minutes: build the CUDA kernels, the GPU
# conformance selection, the tensor-core cross-check, compute-sanitizer, a speed table; results
# written as they come to bench/results/gpu-<gpu>/ (GPU_CHECK_ARGS="--full" or "--out DIR").
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info fastattn/_C*.so .pytest_cache $(TRITON36)
