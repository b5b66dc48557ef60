# The two everyday commands. Each uses the active virtual environment, or makes .venv here.
#   make demo   run the main job on the built-in default
#   make test   run the test suite
PYTHON := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,.venv/bin/python)
INSTALLED := $(dir $(PYTHON)).homediff-installed

.PHONY: demo test test-avx2 setup
setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv .venv
	@# torch first, so that nothing pulls a several-GB CUDA build onto a CPU machine
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	@touch $@

demo: setup
	$(PYTHON) -m homediff demo --out runs/demo

test: setup
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q

# The suite as an AVX2-only laptop would run it, in one thread: oneDNN and ATen are held to AVX2, so
# bfloat16 matrix products are emulated (checked first: the run stops if they are not slow).
# torch.compile's kernels go to a cache of this pass's own, apart from the native pass's.
AVX2 := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1
test-avx2: setup
	$(AVX2) $(PYTHON) benchmarks/emulation_check.py
	cache=$$(mktemp -d) && $(AVX2) TORCHINDUCTOR_CACHE_DIR=$$cache OMP_WAIT_POLICY=PASSIVE \
		HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q; status=$$?; \
		rm -rf "$$cache"; exit $$status
