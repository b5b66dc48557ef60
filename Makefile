# The two everyday commands. Each uses the active virtual environment, or makes .venv here.
#   make demo   run the main job on the built-in default
#   make test   run the test suite
PYTHON := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,.venv/bin/python)
INSTALLED := $(dir $(PYTHON)).homediff-installed

.PHONY: demo test setup
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
