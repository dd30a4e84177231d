# The two set-up commands of README.md: `make bench` (main job) and `make test`.
# Each creates .venv when missing (with system site packages, so a machine that already
# has a CUDA torch uses it), installs torch only when none is importable, then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-triton bench gate-sm90 cutlass-headers clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,hf,bench,examples,cuda]"
	# Model families for the surgery tests, without their torchvision requirement: PyPI's
	# torchvision is a CUDA build that pulls a CUDA torch and does not import beside the CPU one.
	$(PY) -m pip install --no-deps "timm>=1.0.17,<2" "open-clip-torch>=3,<4"
	touch $@

# The whole suite, then the Triton kernels again through the CPU interpreter (on a GPU
# machine the first run already covers them on the device).
test: $(STAMP)
	$(PY) -m pytest tests
	$(MAKE) test-triton

test-triton: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests -k triton -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/latency_table.py

# The static sm_90 gate under Triton 3.6 (README: Benchmarks), in a fresh venv made and removed here.
gate-sm90:
	venv=$$(mktemp -d /tmp/lora_kernels_sm90.XXXXXX) && trap 'rm -rf "$$venv"' EXIT && \
	$(PYTHON) -m venv "$$venv" && \
	"$$venv/bin/pip" install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" && \
	"$$venv/bin/python" benchmarks/triton_sm90.py --quick --no-cache --only-flagged

# CUTLASS's headers (from the nvidia-cutlass wheel that setup installs) copied into the ignored
# .cutlass/include, where setup.py looks last: a GPU machine without network builds the CUDA
# extension from that copy when it travels with the working tree (README: CUDA backend).
cutlass-headers: $(STAMP)
	src=$$($(PY) benchmarks/cuda_ptx_check.py --cutlass-include) && \
	if [ "$$src" != "$$(pwd)/.cutlass/include" ]; then rm -rf .cutlass && mkdir .cutlass && cp -r "$$src" .cutlass/include; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
