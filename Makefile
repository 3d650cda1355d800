# One virtual environment for everything; `make test` and `make demo` create it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the pinned CPU build first, so nothing below pulls several GB of CUDA wheels.
# Override on GPU machines, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: install test test-fast demo clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,demo,mergekit]"
	touch $(INSTALLED)

test: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -rs tests

test-fast: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/trap2 demo --output_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
