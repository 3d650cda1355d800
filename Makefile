# One virtual environment for everything; `make test` and `make demo` create it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without nvidia-smi get the pinned CPU build from PyTorch's CPU wheel index, so nothing below pulls
# several GB of CUDA wheels. Where that index cannot be reached, the plain pin is installed instead; a short
# timeout and no retries keep the failed attempt to seconds. --index-url replaces only PyPI: wheels in pip's
# find-links folders are still found. Override on GPU machines, e.g. `make test TORCH_SPEC=torch==2.13.0`.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==$(TORCH_VERSION))
PIP_INSTALL = $(BIN)/python -m pip install --quiet
TORCH_INSTALL = $(if $(HAS_GPU),$(PIP_INSTALL) "$(TORCH_SPEC)",\
	$(PIP_INSTALL) --timeout 10 --retries 0 --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)" || $(PIP_INSTALL) "$(TORCH_SPEC)")
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: install test test-fast demo clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(TORCH_INSTALL)
	$(PIP_INSTALL) -e ".[test,demo,mergekit]"
	touch $(INSTALLED)

test: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -rs tests

test-fast: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/trap2 demo --output_dir $(DEMO_DIR)

# out/: where the recipes and the README's examples write their runs (git-ignored).
clean:
	rm -rf $(VENV) $(DEMO_DIR) out .pytest_cache
